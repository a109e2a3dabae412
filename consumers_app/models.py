"""Models of the example handlers."""

from django.conf import settings
from django.db import models

from notifications.models import InboundFrame


class ChatMessage(models.Model):
    """What the example `chat.message` handler stores: a line said in a chat room."""

    room = models.CharField(max_length=200, db_index=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    text = models.TextField()
    inbound = models.OneToOneField(InboundFrame, on_delete=models.CASCADE, related_name="chat")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.room}: {self.text[:40]}"
