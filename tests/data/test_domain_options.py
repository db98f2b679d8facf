"""The `domains` option of the domain datasets: a list of names, or one name as `--set
dataset.options.domains=amazon` gives it; anything else is a ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpgp.config import load_config
from fedpgp.data import load_dataset
from fedpgp.errors import ConfigError


def _options(data_root: Path, name: str, domains: str) -> dict[str, object]:
    cfg = load_config(
        None,
        [f"dataset.name={name}", f"dataset.root={data_root}", f"dataset.options.domains={domains}"],
    )
    return cfg.dataset.options


@pytest.mark.parametrize(
    ("name", "domain"), [("office_caltech10", "dslr"), ("domainnet", "quickdraw")]
)
def test_one_domain_given_on_the_command_line_is_that_domain(
    data_root: Path, name: str, domain: str
) -> None:
    options = _options(data_root, name, domain)
    assert options == {"domains": domain}
    splits = load_dataset(name, data_root, **options)
    assert splits.domain_names == [domain]
    assert set(splits.train.domains.tolist()) == {0}
    listed = load_dataset(name, data_root, domains=[domain])
    assert splits.fingerprint() == listed.fingerprint()


def test_a_list_given_on_the_command_line_keeps_the_domains_order(data_root: Path) -> None:
    options = _options(data_root, "office_caltech10", "[webcam, amazon]")
    splits = load_dataset("office_caltech10", data_root, **options)
    assert splits.domain_names == ["amazon", "webcam"]


@pytest.mark.parametrize("domains", [3, {"amazon": 1}, ["amazon", 2], [["amazon"]], True])
def test_a_domains_option_that_is_not_names_is_a_config_error(
    tmp_path: Path, domains: object
) -> None:
    # The option is checked before the disk: tmp_path holds no dataset.
    with pytest.raises(ConfigError) as caught:
        load_dataset("office_caltech10", tmp_path, domains=domains)
    assert str(caught.value) == (
        "dataset.options.domains of 'office_caltech10': expected a domain name or a list of "
        f"them (of amazon, caltech, dslr, webcam), found {domains!r}"
    )


@pytest.mark.parametrize("domains", ["mars", [], ["amazon", "mars"]])
def test_an_unknown_or_empty_domain_list_names_the_key(tmp_path: Path, domains: object) -> None:
    with pytest.raises(ConfigError, match=r"^dataset\.options\.domains of 'domainnet': expected"):
        load_dataset("domainnet", tmp_path, domains=domains)
