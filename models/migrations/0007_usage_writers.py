from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('keyplane', '0006_bucket_fillfactor')]

    initial = False

    operations = [
        ops.CreateModel(
            name='UsageWriter',
            fields=[
                ('writer', fields.BigIntField(primary_key=True, generated=False, unique=True, db_index=True)),
                ('flushed', fields.BigIntField(default=0)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'usage_writers', 'app': 'keyplane', 'pk_attr': 'writer', 'table_description': 'One row per usage recorder (a process, app.usage): the number of its last committed flush.'},
            bases=['Model'],
        ),
    ]
