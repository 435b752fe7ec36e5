"""Job history, per-project annotator identity mode, and invite tokens.

* ``jobs.history``: a JSON list of the job's events (queued, claimed, released,
  recovered, failed, succeeded, cancelled), each with its time, attempt, worker and
  reason, so a job recovered after its worker died keeps that trace after it succeeds.
  Existing jobs start with an empty list.
* ``projects.identity``: how the app knows who is labelling, ``open`` (the name in the
  URL, as before) or ``invite`` (a link carrying a random token). Existing projects get
  ``open``, so a store created before this revision keeps working as it did; projects
  created afterwards default to ``invite`` (:meth:`fkpd.store.Store.create_project`).
* ``invites``: one row per invite link: the project, the annotator it speaks for, the
  sha256 of its token (the token itself is never stored) and when it was revoked.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Written by hand so it does not import the models. No table is rebuilt (SQLite's
``ALTER TABLE ADD COLUMN`` is enough), so the upgrade is safe on a store that holds data
and has foreign keys switched on.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("history", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
    op.add_column(
        "projects", sa.Column("identity", sa.String(length=16), nullable=False, server_default="open")
    )
    op.create_table(
        "invites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_invites_annotator_id_annotators")
        ),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_invites_project_id_projects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invites")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_invites_token_sha256")),
    )
    op.create_index("ix_invites_project_annotator", "invites", ["project_id", "annotator_id"])


def downgrade() -> None:
    op.drop_index("ix_invites_project_annotator", table_name="invites")
    op.drop_table("invites")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("identity")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("history")
