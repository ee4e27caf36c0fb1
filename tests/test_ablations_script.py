"""scripts/ablations.py builds the ablation overrides from train.yaml's stage schedule."""

import pytest


@pytest.fixture(scope="module")
def ablations(load_script):
    return load_script("ablations")


@pytest.mark.parametrize("variant,term", [("no_prior", "normality"), ("no_disease", "disease"),
                                          ("no_fine_grained", "fine_grained"), ("no_detection", "detection")])
def test_each_variant_drops_its_term_everywhere(ablations, variant, term):
    import ast

    args = ablations.overrides(variant)
    stages = ast.literal_eval(args[args.index("--stages") + 1])
    assert stages and all(term not in s["terms"] and s["terms"] for s in stages)
    assert all(term not in s.get("weights", {}) for s in stages)
    full = ablations.stages_without("no-such-term")
    # the other terms are untouched
    kept = {t for s in full for t in s["terms"]} - {term}
    assert kept == {t for s in stages for t in s["terms"]}
    assert ("--network_def#prior" in args) == (variant == "no_prior")


def test_full_has_no_overrides_and_unknown_variants_fail(ablations):
    assert ablations.overrides("full") == []
    with pytest.raises(ValueError, match="unknown variant"):
        ablations.overrides("no_everything")
