from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('keyplane', '0007_usage_writers')]

    initial = False

    operations = [
        ops.AddField(
            model_name='ManagementToken',
            name='created_by_member_id',
            field=fields.IntField(null=True),
        ),
    ]
