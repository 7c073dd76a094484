"""load_function: plug-ins by dotted path with clear errors."""

from __future__ import annotations

import pytest

from slime.utils.misc import atomic_write_json, load_function


def test_loads_function_and_class():
    assert load_function("slime.utils.misc.atomic_write_json") is atomic_write_json
    assert load_function("slime.rollout.data_source.RolloutDataSourceWithBuffer").__name__ == (
        "RolloutDataSourceWithBuffer"
    )


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("", ValueError, "non-empty"),
        ("nodots", ValueError, "pkg.module.fn"),
        ("no_such_pkg_xyz.fn", ImportError, "module 'no_such_pkg_xyz' not found"),
        ("slime.utils.misc.no_such_fn", AttributeError, "has no attribute 'no_such_fn'"),
        ("slime.rollout.sglang_rollout.__all__", TypeError, "not a callable"),
    ],
)
def test_errors_name_the_problem(path, error, message):
    with pytest.raises(error, match=message):
        load_function(path)


def test_atomic_write_json(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert p.read_text().strip().startswith("{") and list((tmp_path / "a").iterdir()) == [p]
