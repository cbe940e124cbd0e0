from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('keyplane', '0002_anomalies')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Member',
            name='invite_expires_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name='Member',
            name='invite_hash',
            field=fields.CharField(null=True, unique=True, max_length=64),
        ),
    ]
