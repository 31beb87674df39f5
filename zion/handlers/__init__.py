"""zion's own answers, composed in front of the app by the worker: built-in
endpoints, static files and the default page. http/ imports none of them."""
