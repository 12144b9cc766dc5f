"""Inert stand-ins for the library objects (Lightning's, OmegaConf's) that hold a checkpoint's hyper-parameters.

Lightning and OmegaConf keep a run's hyper-parameters as their own classes, which the safe loader refuses
and which need those libraries (not dependencies) to unpickle. Stand-ins take their place: they run nothing,
keep the plain content of the pickled state (dicts, lists, numbers, strings) and are replaced by it once
loaded, so a Lightning .ckpt loads safely and its config reads as a dict. Other objects need trust.
"""
import torch

METADATA_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.",
                    "pathlib.", "argparse.Namespace", "collections.defaultdict",
                    # and the types OmegaConf's metadata names:
                    *(f"builtins.{t}" for t in "dict list tuple str int float bool object".split()))


class Plain:
    """stands in for a metadata object (its subclass's `name`): takes any arguments and state, keeps them"""
    content = None  # an object pickled without state

    def __init__(self, *args, **kwargs):  # built by a call: a path from its parts, for instance
        self.content = args

    def __setstate__(self, state):  # built from its attributes: OmegaConf's nodes, dataclasses, Namespace
        self.content = state


def stand_ins(path):
    """(stand-in, name) pairs for the safe loader when every object it would refuse is metadata"""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a readable archive: torch.load says why
        return []
    if not all(n.startswith(METADATA_MODULES) for n in names):
        return []
    # AttributeDict is a dict with attribute access, defaultdict(factory) a dict: plain dicts keep their
    # content (the unpickler fills no other kind); every other name gets a Plain of its own
    return [(dict if n.endswith(".AttributeDict") else (lambda *factory: {}) if n == "collections.defaultdict"
             else type(n.rsplit(".", 1)[-1], (Plain,), {"name": n}), n) for n in names]


def plain(obj, active=frozenset()):
    """obj with every stand-in replaced by its plain content: an OmegaConf DictConfig or ListConfig by
    the dict or list of its values (its pickled state keeps them under '_content', each value node's
    under '_val'), another object by the dict of its attributes, a type by its name. In place."""
    if id(obj) in active:  # a container inside itself (a crafted file): cut the loop
        return None
    active = active | {id(obj)}
    if isinstance(obj, type) and issubclass(obj, Plain):
        return obj.name
    if isinstance(obj, Plain):
        state = obj.content
        if isinstance(state, dict) and ("_content" in state or "_val" in state):  # OmegaConf's (not its _parent)
            return plain(state["_content"] if "_content" in state else state["_val"], active)
        return plain(state, active)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = plain(v, active)
    elif isinstance(obj, list):
        obj[:] = [plain(v, active) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(plain(v, active) for v in obj)
    return obj
