"""WebSocket URL routes."""

from django.urls import path

from consumers_app.consumer import RealtimeConsumer

websocket_urlpatterns = [path("ws/", RealtimeConsumer.as_asgi())]
