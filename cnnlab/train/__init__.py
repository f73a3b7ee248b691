"""The training stage: the loop (loop.py), its callbacks, progress and state, the engine's step and
evaluation pass, optimizers and schedules, checkpoints, the run folder, DDP, lr-find.

`cnnlab.train` is also the public function: `cnnlab.train(data="cifar10", epochs=5)` calls
cnnlab.api.train. A function of that name in cnnlab/__init__.py would be replaced by this package
as soon as any `cnnlab.train.*` module is imported (Python sets the package attribute), so the
package itself is made callable instead: both meanings hold whatever is imported first."""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
