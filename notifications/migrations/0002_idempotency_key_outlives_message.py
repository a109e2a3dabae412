"""An idempotency key outlives its message: SET_NULL instead of CASCADE, and `completed_at` to
tell a key whose message was deleted from one still in flight."""

import django.db.models.deletion
from django.db import migrations, models
from django.db.models import F


def mark_completed(apps, schema_editor):
    """Keys already answered were completed when they were created (close enough)."""
    IdempotencyKey = apps.get_model("notifications", "IdempotencyKey")
    IdempotencyKey.objects.filter(message__isnull=False).update(completed_at=F("created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="idempotencykey",
            name="completed_at",
            field=models.DateTimeField(
                blank=True, help_text="When the request was accepted (null while in flight).", null=True
            ),
        ),
        migrations.AlterField(
            model_name="idempotencykey",
            name="message",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="notifications.message",
            ),
        ),
        migrations.RunPython(mark_completed, migrations.RunPython.noop),
    ]
