from keras_recurrentgemma.ops.scan import IMPLEMENTATIONS
from keras_recurrentgemma.ops.scan import rg_lru_scan
from keras_recurrentgemma.ops.scan import rg_lru_scan_reference
