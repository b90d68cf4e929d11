from keras_recurrentgemma.ops.rg_lru import rg_lru
from keras_recurrentgemma.ops.rg_lru import rg_lru_gates
from keras_recurrentgemma.ops.scan import IMPLEMENTATIONS
from keras_recurrentgemma.ops.scan import resolve_implementation
from keras_recurrentgemma.ops.scan import rg_lru_scan
from keras_recurrentgemma.ops.scan import rg_lru_scan_doubling
from keras_recurrentgemma.ops.scan import rg_lru_scan_reference
