"""Label quality: gold pairs and annotators excluded from training (issue #13, point 5).

* ``pairs.gold``: ``"left"`` or ``"right"`` for a gold pair (its answer is clear from the
  clips' ground truth: one succeeds and the other does not, or their returns differ by
  more than a margin), NULL for every other pair. Existing pairs get NULL: they are
  ordinary pairs, and their answers keep training.
* ``annotator_exclusions``: one row per (project, annotator) whose comparisons are left
  out of training: when, by whom, why. The comparisons themselves stay; deleting the row
  takes them back.

No change is needed for the minimum viewing time: it is counted from ``leases.leased_at``
(see :class:`fkpd.store.models.Lease`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Written by hand so it does not import the models. No table is rebuilt (SQLite's
``ALTER TABLE ADD COLUMN`` / ``DROP COLUMN`` are enough), so the upgrade and the downgrade
are safe on a store that holds data and has foreign keys switched on.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("pairs", sa.Column("gold", sa.String(length=8), nullable=True))
    op.create_table(
        "annotator_exclusions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("excluded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("excluded_by", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_annotator_exclusions_annotator_id_annotators")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_annotator_exclusions_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotator_exclusions")),
        sa.UniqueConstraint("project_id", "annotator_id", name="uq_annotator_exclusions_project_annotator"),
    )


def downgrade() -> None:
    op.drop_table("annotator_exclusions")
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): no rebuild of a table other rows point at
    op.drop_column("pairs", "gold")
