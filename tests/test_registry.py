import pytest

from patchbench.registry import Registry, UnknownNameError


@pytest.fixture
def reg():
    r = Registry("widget")

    @r.register("gradcam")
    def a():
        return "a"

    @r.register("gradcam_pp")
    def b():
        return "b"

    @r.register("rollout")
    def c():
        return "c"

    return r


def test_create_and_list(reg):
    assert reg.create("rollout") == "c"
    assert reg.list() == ["gradcam", "gradcam_pp", "rollout"]
    assert reg.list("grad*") == ["gradcam", "gradcam_pp"]
    assert reg.list(["roll*", "*pp"]) == ["gradcam_pp", "rollout"]
    assert reg.list("nothing*") == []
    assert "rollout" in reg and "x" not in reg


def test_unknown_name_lists_valid_names_and_suggests(reg):
    with pytest.raises(UnknownNameError) as e:
        reg.create("rolout")
    msg = str(e.value)
    assert "unknown widget 'rolout'" in msg
    assert "Did you mean 'rollout'" in msg
    assert "gradcam, gradcam_pp, rollout" in msg


def test_duplicate_registration_is_refused(reg):
    with pytest.raises(ValueError, match="already registered"):

        @reg.register("rollout")
        def other():
            return None


def test_project_registries_are_populated():
    from patchbench.datasets import list_datasets
    from patchbench.methods import list_methods
    from patchbench.models import list_operators

    assert {"random", "rollout", "gradcam", "integrated_gradients", "attention", "attnlrp", "lrp",
            "libragrad"} <= set(list_methods())
    assert {"toy-count", "glyphs"} <= set(list_datasets())
    assert set(list_operators()) == {"mean", "zero", "blur", "noise", "drop", "placeholder", "road",
                                     "inpaint", "zero_embedding"}
