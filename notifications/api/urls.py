from django.urls import path

from notifications.api import presence, views

urlpatterns = [
    path("messages/", views.MessageCreateView.as_view(), name="message-create"),
    path("messages/batch/", views.MessageBatchView.as_view(), name="message-batch"),
    path("messages/<uuid:pk>/", views.MessageDetailView.as_view(), name="message-detail"),
    path("inbound/<uuid:pk>/", views.InboundDetailView.as_view(), name="inbound-detail"),
    path("presence/", presence.PresenceView.as_view(), name="presence"),
    path("history/", views.HistoryView.as_view(), name="history"),
    path("ws-tickets/", views.TicketView.as_view(), name="ws-ticket"),
]
