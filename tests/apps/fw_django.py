"""Django through its own ASGI handler: a sync view and an async view."""

import django
from django.conf import settings

settings.configure(
    DEBUG=False, SECRET_KEY="test-only", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=[], MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
)
django.setup()

import threading  # noqa: E402

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def sync_view(request):
    return JsonResponse({"view": "sync", "method": request.method,
                         "main_thread": threading.current_thread() is threading.main_thread()})


async def async_view(request):
    return JsonResponse({"view": "async", "body": request.body.decode()})


urlpatterns = [path("sync/", sync_view), path("async/", async_view)]
application = get_asgi_application()
