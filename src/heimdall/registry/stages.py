"""MLflow's stages kept in step with the ``production`` and ``staging`` aliases.

Loaders written for MLflow's stages take the version whose ``current_stage`` is ``Production``
(or open ``models:/NAME/Production``: MLflow's newest version in that stage). With
``Settings.sync_stages`` every move of ``production`` or ``staging`` (promote, publish's alias
step, rollback) also moves the stage, under the same registry lock, right after the alias: the
holder is put in the stage first (a loader always finds one), then every other version in it is
archived, so the stage names exactly what the alias names. A version holding both aliases is in
``Production``: a version has one stage.

Variant aliases (``staging-int8``) move no stage: a stage-based loader takes any version in
the stage, and MLflow resolves ``models:/NAME/Production`` to the newest one, which would be
the variant, never what ``@production`` names.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import structlog

from heimdall.registry.client import call, search_versions
from heimdall.registry.names import PRODUCTION, STAGES, STAGING
from heimdall.registry.records import aliases_of

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = structlog.get_logger(__name__)

# The aliases whose holder gets a stage, in precedence order (a version has one stage).
STAGE_OF_ALIAS = {PRODUCTION: STAGES[PRODUCTION], STAGING: STAGES[STAGING]}
ARCHIVED = STAGES["archived"]


@dataclass(frozen=True)
class StageMove:
    """One version's stage changed to follow the aliases."""

    version: str
    stage: str
    previous: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync_stages(client: MlflowClient, name: str) -> tuple[StageMove, ...]:
    """Put each stage alias's holder in its stage, then archive the others there (lock held).

    A stage whose alias has no holder is left as it is: nothing says what should be in it.
    """
    aliases = aliases_of(call(client.get_registered_model, name))
    stages = {
        str(v.version): v.current_stage or "None"
        for v in search_versions(client, f"name = '{name}'")
    }
    wanted: dict[str, str] = {}
    for alias, stage in STAGE_OF_ALIAS.items():
        holder = aliases.get(alias)
        if holder is not None:
            wanted.setdefault(holder, stage)
    synced = {STAGE_OF_ALIAS[a] for a in aliases if a in STAGE_OF_ALIAS}
    moves = [(v, stage) for v, stage in wanted.items() if stages.get(v) != stage]
    moves += [
        (v, ARCHIVED)
        for v, stage in sorted(stages.items(), key=lambda item: int(item[0]))
        if stage in synced and v not in wanted
    ]
    done: list[StageMove] = []
    for version, stage in moves:
        if any(m.version == version for m in done):
            continue  # archived already, by a holder's move into its stage
        # A holder's move archives the others in its stage in the same call (one transaction
        # on a SQL store), so models:/NAME/Production never names two versions in between.
        held = wanted.get(version) == stage
        transition_stage(client, name, version, stage, archive_others=held)
        done.append(StageMove(version, stage, stages.get(version, "None")))
        if held:
            done += [
                StageMove(other, ARCHIVED, was)
                for other, was in sorted(stages.items(), key=lambda item: int(item[0]))
                if was == stage and other != version and other not in wanted
            ]
    if done:
        log.info("registry.stages_synced", name=name, moves=[m.to_dict() for m in done])
    return tuple(done)


def transition_stage(
    client: MlflowClient, name: str, version: str, stage: str, *, archive_others: bool = False
) -> None:
    """Set one version's stage; ``archive_others`` archives the other versions in that stage
    in the same call."""
    # Stages are deprecated since MLflow 2.9 (a FutureWarning on every call), yet loaders still
    # read them: the transition is made and the warning replaced by our own event.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        call(
            client.transition_model_version_stage,
            name,
            version,
            stage,
            archive_existing_versions=archive_others,
        )
    log.info("registry.legacy_stage_set", name=name, version=version, stage=stage)
