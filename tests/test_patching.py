import torch

from flux_infer.patching import PatchRecorder


class Box:
    def __init__(self):
        self.value = 1

    def method(self):
        return "class"


def test_setattr_restores_values_and_removes_new_attributes():
    box, recorder = Box(), PatchRecorder()
    recorder.setattr(box, "value", 2)
    recorder.setattr(box, "extra", 3)
    assert (box.value, box.extra) == (2, 3)
    assert recorder.rollback() == []
    assert box.value == 1 and not hasattr(box, "extra") and len(recorder) == 0


def test_module_swap_parameter_buffer_and_hooks_roll_back():
    parent = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    original, weight = parent[0], parent[0].weight
    recorder = PatchRecorder()
    old = recorder.replace_module(parent, "0", torch.nn.Identity())
    assert old is original and isinstance(parent[0], torch.nn.Identity)
    recorder.setattr(original, "weight", torch.nn.Parameter(torch.zeros(3, 3)))
    recorder.register_buffer(original, "scale", torch.ones(1))
    calls = []
    recorder.register_forward_hook(parent, lambda m, a, o: calls.append(1))
    parent(torch.ones(1, 3))
    assert calls == [1]
    recorder.rollback()
    assert parent[0] is original and original.weight is weight and "scale" not in original._buffers
    parent(torch.ones(1, 3))
    assert calls == [1]


def test_bound_method_shadows_only_this_instance():
    a, b, recorder = Box(), Box(), PatchRecorder()
    recorder.bind_method(a, "method", lambda self: "patched")
    assert (a.method(), b.method()) == ("patched", "class")
    recorder.rollback()
    assert a.method() == "class" and "method" not in vars(a)


def test_rollback_continues_past_a_failing_undo():
    box, recorder = Box(), PatchRecorder()
    recorder.setattr(box, "value", 5)
    recorder.on_rollback("broken", lambda: 1 / 0)
    errors = recorder.rollback()
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
    assert box.value == 1


def test_changes_are_attributed_to_their_owner():
    recorder = PatchRecorder()
    recorder.owned_by("my_plugin")
    recorder.setattr(Box(), "value", 0)
    assert recorder.changes[0].description == "[my_plugin] set Box.value"
