"""Joining a source, without a server: the preflight's judgments for each place a database runs,
and the edits `source add` and `remove` make to the resources."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from audit_platform.environment import load_environment
from audit_platform.policy import load_policy
from audit_platform.sources.check import Level
from audit_platform.sources.onboarding import (
    OnboardingError,
    name_in_environment,
    policy_to_join,
    remove_from_environment,
    write_policy,
)
from audit_platform.sources.preflight import Provider, ServerFacts, judge

READY = ServerFacts(
    provider=Provider.postgres,
    version_num=150010,
    wal_level="logical",
    role="capture",
    may_replicate=True,
    superuser=True,
    may_install=True,
    max_replication_slots=10,
    slots_used=3,
    max_wal_senders=10,
    senders_used=3,
    slot_exists=False,
    max_slot_wal_keep_size="51200",
)


def problems(facts: ServerFacts) -> dict[str, tuple[Level, str]]:
    return {f.subject: (f.level, f.fix) for f in judge(facts) if f.level is not Level.ok}


def test_a_ready_server_passes():
    assert problems(READY) == {}


@pytest.mark.parametrize(
    ("provider", "fix"),
    [
        (Provider.postgres, "ALTER SYSTEM SET wal_level = 'logical'; then restart PostgreSQL"),
        (Provider.rds, "set rds.logical_replication = 1 in the instance's DB parameter group"),
        (Provider.cloudsql, "--database-flags=cloudsql.logical_decoding=on"),
        (Provider.azure, "--name wal_level --value logical and restart the server"),
    ],
)
def test_wal_level_is_fixed_in_the_words_of_where_the_database_runs(provider, fix):
    level, found = problems(replace(READY, provider=provider, wal_level="replica"))["wal_level"]
    assert level is Level.error and fix in found


@pytest.mark.parametrize(
    ("provider", "fix"),
    [
        (Provider.postgres, "ALTER ROLE capture REPLICATION; (as a superuser)"),
        (Provider.rds, "GRANT rds_replication TO capture;"),
        (Provider.cloudsql, "ALTER USER capture WITH REPLICATION; (as cloudsqlsuperuser)"),
        (Provider.azure, "ALTER ROLE capture WITH REPLICATION; (as azure_pg_admin)"),
    ],
)
def test_a_role_that_may_not_replicate_is_told_its_grant(provider, fix):
    level, found = problems(replace(READY, provider=provider, may_replicate=False))["role"]
    assert level is Level.error and found == fix


def test_slots_and_senders_left_and_wal_kept():
    full = replace(READY, slots_used=10, senders_used=10, max_slot_wal_keep_size="-1")
    found = problems(full)
    assert found["replication slots"][0] is Level.error
    assert "max_replication_slots = '14'" in found["replication slots"][1]
    assert found["wal senders"][0] is Level.error
    assert found["max_slot_wal_keep_size"][0] is Level.warning
    # A source joining again already has its slot: a full server is no obstacle to it.
    assert "replication slots" not in problems(replace(full, slot_exists=True))


def test_without_a_superuser_capture_works_and_says_what_it_misses():
    found = problems(replace(READY, provider=Provider.rds, superuser=False))
    assert found["superuser"][0] is Level.warning
    assert "rds_superuser" in found["superuser"][1]
    assert problems(replace(READY, may_install=False))["privileges"][0] is Level.error
    assert problems(replace(READY, version_num=130012))["server version"][0] is Level.error


def test_a_new_source_gets_a_first_policy_and_an_existing_one_keeps_its_own(tmp_path):
    policy, new = policy_to_join(tmp_path, "billing", ["public.orders", "public.refunds"])
    assert new and list(policy.tables) == ["public.orders", "public.refunds"]
    path = write_policy(tmp_path, policy)
    assert load_policy(path) == policy and path.read_text().startswith("# Tracking policy")
    again, new = policy_to_join(tmp_path, "billing", [])
    assert again == policy and not new
    with pytest.raises(OnboardingError, match="edit the policy file"):
        policy_to_join(tmp_path, "billing", ["public.orders"])
    with pytest.raises(OnboardingError, match="name its tables with --tables"):
        policy_to_join(tmp_path, "other", [])
    with pytest.raises(OnboardingError, match=r"must be written schema\.table"):
        policy_to_join(tmp_path, "other", ["orders"])


def test_the_environment_file_keeps_its_comments_and_refuses_a_second_variable(tmp_path):
    folder = tmp_path / "environments"
    folder.mkdir()
    path = folder / "dev.yaml"
    path.write_text(
        "# dev: what it captures\nsources:\n  shop:\n    url_env: SHOP_URL  # the shop\n"
        "retention_days: 7\n"
    )
    assert name_in_environment(tmp_path, "dev", "billing", "BILLING_URL") is True
    assert name_in_environment(tmp_path, "dev", "billing", "BILLING_URL") is False
    with pytest.raises(OnboardingError, match="url_env BILLING_URL, not OTHER"):
        name_in_environment(tmp_path, "dev", "billing", "OTHER")
    text = path.read_text()
    assert "# dev: what it captures" in text and "# the shop" in text
    assert yaml.safe_load(text)["sources"]["billing"] == {"url_env": "BILLING_URL"}
    assert load_environment(tmp_path, "dev").retention_days == 7
    assert remove_from_environment(tmp_path, "dev", "billing") is True
    assert remove_from_environment(tmp_path, "dev", "billing") is False
    assert list(load_environment(tmp_path, "dev").sources) == ["shop"]
    assert "# the shop" in path.read_text()
    # An environment whose sources were written as an empty flow mapping.
    path.write_text("sources: {}\n")
    name_in_environment(tmp_path, "dev", "billing", "BILLING_URL")
    assert list(load_environment(tmp_path, "dev").sources) == ["billing"]
