from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

INDEX = "uid_members_email"


class _StateOnlyAlter(ops.AlterField):
    """The model-state side only; the index is created by _unique_email."""

    async def database_forward(self, *args, **kwargs) -> None:
        return None

    async def database_backward(self, *args, **kwargs) -> None:
        return None


async def _unique_email(apps, editor) -> None:
    """`login(email, password)` names no workspace, so an email belongs to one member. The
    service checked that before inserting, but two invitations of one email into two workspaces
    at once could both pass the check; the index makes the second one fail. A database that
    already holds such a pair is refused with the emails named (remove one of each pair)."""
    client = editor.client
    _, rows = await client.execute_query(
        'SELECT "email" FROM "members" GROUP BY "email" HAVING COUNT(*) > 1 ORDER BY "email"'
    )
    if rows:
        emails = ", ".join(repr(row["email"]) for row in rows)
        raise RuntimeError(
            f"members share an email across workspaces: {emails}; remove all but one of each"
        )
    await client.execute_script(f'CREATE UNIQUE INDEX "{INDEX}" ON "members" ("email");')


async def _drop_unique_email(apps, editor) -> None:
    await editor.client.execute_script(f'DROP INDEX "{INDEX}";')


class Migration(migrations.Migration):
    dependencies = [('keyplane', '0008_token_creators')]

    initial = False

    operations = [
        _StateOnlyAlter(
            model_name='Member',
            name='email',
            field=fields.CharField(max_length=254, unique=True),
        ),
        ops.RunPython(_unique_email, _drop_unique_email),
    ]
