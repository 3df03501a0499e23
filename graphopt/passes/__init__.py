"""Built-in passes, one per file. Importing this package registers them."""
from . import cleanup, distill, fold_bn  # noqa: F401
from . import quantize  # noqa: F401
from . import lowrank  # noqa: F401
from . import prune  # noqa: F401
from . import sparsify  # noqa: F401
from . import cluster  # noqa: F401
