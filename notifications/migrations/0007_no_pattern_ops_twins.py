from django.db import migrations

# On PostgreSQL Django gives every indexed CharField a second, varchar_pattern_ops index for
# LIKE 'prefix%' lookups, which nothing here makes (the admin's searches are LIKE '%text%', which
# no btree serves). These three were maintained on every delivery, inbound frame and attempt.
# The models are unchanged (their plain indexes stay); Django drops indexes with IF EXISTS, so a
# later change of these fields still migrates.
TWINS = [
    ("notifications_delivery_instance_c62cd81f_like", "notifications_delivery", "instance"),
    ("notifications_inboundframe_event_77097865_like", "notifications_inboundframe", "event"),
    ("notifications_inboundframe_status_180f1fff_like", "notifications_inboundframe", "status"),
]


def drop_twins(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for name, _, _ in TWINS:
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')


def restore_twins(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for name, table, column in TWINS:
            schema_editor.execute(
                f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}" varchar_pattern_ops)'
            )


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0006_fewer_indexes"),
    ]

    operations = [migrations.RunPython(drop_twins, restore_twins)]
