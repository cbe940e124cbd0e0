from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.migrations.constraints import UniqueConstraint
from tortoise import fields

OLD_UNIQUE = 'CONSTRAINT "uid_usage_bucke_key_id_5c39a2" UNIQUE ("key_id", "bucket_start")'
NEW_UNIQUE = 'CONSTRAINT "uid_usage_buckets_writer" UNIQUE ("key_id", "bucket_start", "writer")'


class _StateOnly:
    """An operation's model-state side only; the table is changed by _swap_unique."""

    async def database_forward(self, *args, **kwargs) -> None:
        return None

    async def database_backward(self, *args, **kwargs) -> None:
        return None


class _StateOnlyRemove(_StateOnly, ops.RemoveConstraint):
    pass


class _StateOnlyAdd(_StateOnly, ops.AddConstraint):
    pass


async def _swap_unique(apps, editor) -> None:
    """(key_id, bucket_start) -> (key_id, bucket_start, writer). PostgreSQL alters the table;
    SQLite cannot drop a table's UNIQUE constraint, so the table is rebuilt with its rows and
    indexes (the recipe of https://www.sqlite.org/lang_altertable.html)."""
    client = editor.client
    if editor.DIALECT != "sqlite":
        await client.execute_script(
            'ALTER TABLE "usage_buckets" DROP CONSTRAINT "uid_usage_bucke_key_id_5c39a2";'
            f'ALTER TABLE "usage_buckets" ADD {NEW_UNIQUE};'
        )
        return
    _, rows = await client.execute_query(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'usage_buckets'"
    )
    table = rows[0]["sql"]
    if OLD_UNIQUE not in table:
        raise RuntimeError(f"usage_buckets has an unexpected schema: {table}")
    _, rows = await client.execute_query(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_buckets'"
        " AND sql IS NOT NULL"
    )
    indexes = [r["sql"] for r in rows]
    new = table.replace(OLD_UNIQUE, NEW_UNIQUE).replace(
        'CREATE TABLE "usage_buckets"', 'CREATE TABLE "new__usage_buckets"', 1
    )
    await client.execute_query(new)
    await client.execute_query('INSERT INTO "new__usage_buckets" SELECT * FROM "usage_buckets"')
    await client.execute_query('DROP TABLE "usage_buckets"')
    await client.execute_query('ALTER TABLE "new__usage_buckets" RENAME TO "usage_buckets"')
    for index in indexes:
        await client.execute_query(index)


class Migration(migrations.Migration):
    dependencies = [('keyplane', '0004_usage_rollup')]

    initial = False

    operations = [
        # Each process writes its own bucket rows (`writer`), so no two processes ever lock the
        # same row; the roll-up merges a closed hour's rows into one (writer -1). Rows written
        # before this migration are writer 0.
        ops.AddField(
            model_name='UsageBucket',
            name='writer',
            field=fields.BigIntField(default=0, db_default=0),
        ),
        _StateOnlyRemove(model_name='UsageBucket', fields=['key_id', 'bucket_start']),
        _StateOnlyAdd(
            model_name='UsageBucket',
            constraint=UniqueConstraint(fields=('key_id', 'bucket_start', 'writer')),
        ),
        ops.RunPython(_swap_unique),
    ]
