from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('keyplane', '0003_invitations')]

    initial = False

    operations = [
        ops.AddField(
            model_name='UsageBucket',
            name='last_used_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name='UsageBucket',
            name='rolled',
            field=fields.BooleanField(default=False, db_default=False),
        ),
        # Every bucket written before this migration is already in its key's lifetime counters.
        ops.RunSQL(
            "UPDATE usage_buckets SET rolled = TRUE",
            reverse_sql="SELECT 1",
        ),
        # The key buckets not yet added to their key's counters: read with every key's usage,
        # and scanned by the hourly roll-up. Small: about two hours of buckets.
        ops.RunSQL(
            "CREATE INDEX idx_usage_buckets_unrolled ON usage_buckets (key_id) WHERE NOT rolled",
            reverse_sql="DROP INDEX idx_usage_buckets_unrolled",
        ),
    ]
