from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('keyplane', '0001_initial')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Anomaly',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('workspace_id', fields.IntField()),
                ('environment_id', fields.IntField()),
                ('key_id', fields.CharField(max_length=32)),
                ('kind', fields.CharField(max_length=32)),
                ('detected_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('detail', fields.CharField(max_length=300)),
            ],
            options={'table': 'anomalies', 'app': 'keyplane', 'indexes': [Index(fields=['workspace_id', 'detected_at'])], 'pk_attr': 'id', 'table_description': 'An event-driven anomaly (NEW_IP, UNUSED_PERMISSION) recorded when it was detected.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='KeyIp',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('key_id', fields.CharField(max_length=32)),
                ('ip', fields.CharField(max_length=45)),
                ('first_seen', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('last_seen', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'key_ips', 'app': 'keyplane', 'unique_together': (('key_id', 'ip'),), 'pk_attr': 'id', 'table_description': 'Where each key has been used from, for NEW_IP detection.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='KeyPermissionUse',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('key_id', fields.CharField(max_length=32)),
                ('permission', fields.CharField(max_length=128)),
                ('first_used', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'key_permission_uses', 'app': 'keyplane', 'unique_together': (('key_id', 'permission'),), 'pk_attr': 'id', 'table_description': 'The first time each key was asked for each permission, for UNUSED_PERMISSION detection.'},
            bases=['Model'],
        ),
        ops.AddField(
            model_name='Workspace',
            name='business_hours',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
    ]
