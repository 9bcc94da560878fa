"""A fake ``tensorrt`` module (10.3, 10.12, 11.x API surfaces) and fake Polygraphy CUDA helpers, for CPU tests.

Only what our code and the real Polygraphy loaders (``NetworkFromOnnxPath``, ``CreateConfig``,
``EngineBytesFromNetwork``, ``EngineFromBytes``, ``LoadPlugins``) call. Differences between versions follow
TensorRT's migration guide: 11 has no ``BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS`` and no
``ILayer.precision`` / ``set_output_type``. Everything done to it is recorded in ``module.calls`` for assertions.
"""

from __future__ import annotations

import enum
import types
from dataclasses import dataclass, field

import numpy as np

WEAK_FLAGS = ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
COMMON_FLAGS = ("TF32", "REFIT", "DISABLE_TIMING_CACHE", "SPARSE_WEIGHTS", "STRIP_PLAN")


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    INT64 = 4


class LayerType(enum.Enum):  # pybind11 enums print as LayerType.CAST
    CONVOLUTION = 0
    NORMALIZATION = 1
    SOFTMAX = 2
    CAST = 3
    IDENTITY = 4
    QUANTIZE = 5
    DEQUANTIZE = 6
    SHAPE = 7
    GRID_SAMPLE = 8
    MATRIX_MULTIPLY = 9
    CONSTANT = 10


@dataclass
class Tensor:
    name: str
    shape: tuple
    dtype: DataType = DataType.FLOAT
    is_shape_tensor: bool = False


class WeakLayer:
    """TensorRT 10's ILayer: precision and output types can be set."""

    def __init__(self, name, kind, out_dtype=DataType.FLOAT):
        self.name, self.type = name, kind
        self.outputs = [Tensor(name + ":0", (1,), out_dtype)]
        self._precision = None
        self.output_types = {}

    num_outputs = property(lambda self: len(self.outputs))

    def get_output(self, j):
        return self.outputs[j]

    @property
    def precision(self):
        return self._precision or DataType.FLOAT

    @precision.setter
    def precision(self, value):
        self._precision = value

    @property
    def precision_is_set(self):
        return self._precision is not None

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class StrongLayer:
    """TensorRT 11's ILayer: no precision, no set_output_type."""

    def __init__(self, name, kind, out_dtype=DataType.FLOAT):
        self.name, self.type = name, kind
        self.outputs = [Tensor(name + ":0", (1,), out_dtype)]

    num_outputs = property(lambda self: len(self.outputs))

    def get_output(self, j):
        return self.outputs[j]


def graph_layers(int8=False):
    """Layers named as TensorRT names them after our ONNX nodes: (name, kind, output dtype, pinned?)."""
    scope = "/model/transformer_module/decoder/layers.0"
    sampler = "/model/pixel_level_module/decoder/encoder/layers.0/self_attn/sampler"
    layers = [
        ("/model/pixel_level_module/encoder/stage0/LayerNormalization", LayerType.NORMALIZATION, DataType.FLOAT, True),
        (f"{scope}/cross_attn/Softmax", LayerType.SOFTMAX, DataType.FLOAT, True),
        (f"{scope}/self_attn/Softmax", LayerType.SOFTMAX, DataType.FLOAT, False),
        (f"{sampler}/GridSample", LayerType.GRID_SAMPLE, DataType.FLOAT, True),
        (f"{sampler}/Cast_3", LayerType.CAST, DataType.HALF, False),  # the fp16 converter's Cast(to=FLOAT16)
        (f"{sampler}/Cast_3_identity", LayerType.IDENTITY, DataType.HALF, False),
        (f"{sampler}/Shape", LayerType.SHAPE, DataType.INT64, False),
        # float outputs inside a pinned scope, never pinned for their kind alone (NOT_PINNED)
        (f"{sampler}/Constant_7", LayerType.CONSTANT, DataType.FLOAT, False),
        ("/model/class_predictor/MatMul", LayerType.MATRIX_MULTIPLY, DataType.FLOAT, False),
    ]
    if int8:
        layers.append(("/model/class_predictor/QuantizeLinear", LayerType.QUANTIZE, DataType.INT8, False))
        layers.append((f"{sampler}/DequantizeLinear", LayerType.DEQUANTIZE, DataType.FLOAT, False))
    return layers


class Network:
    def __init__(self, module, flags):
        self.module, self.flags = module, flags
        self.inputs, self.layers = [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))
    num_outputs = property(lambda self: 0)

    def get_input(self, i):
        return self.inputs[i]

    def get_layer(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def get_flag(self, flag):
        return bool(self.flags & (1 << int(flag)))


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors, self.flags = network, [], 0

    def clear_flag(self, flag):
        pass

    def parse_from_file(self, path):
        m = self.network.module
        import onnx

        model = onnx.load(path)
        to_fp16 = sum(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16 for n in model.graph.node)
        m.calls.append(("parse", path, to_fp16))
        if m.parse_error:
            self.errors = [m.parse_error]
            return False
        self.network.inputs = [Tensor("pixel_values", (-1, 3, 64, 96))]
        layer_class = WeakLayer if m.weak else StrongLayer
        self.network.layers = [layer_class(n, k, d) for n, k, d, _ in graph_layers(m.int8_graph)]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


@dataclass
class TimingCache:
    version: str
    entries: set = field(default_factory=set)

    def combine(self, other, ignore_mismatch):
        if other.version != self.version and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True

    def serialize(self):
        return f"cache {self.version}: {','.join(sorted(self.entries))}".encode()


def parse_cache(data: bytes):
    text = data.decode()
    if not text:
        return None, set()
    if not text.startswith("cache "):
        raise RuntimeError("timing cache: bad magic")
    version, _, entries = text[len("cache ") :].partition(": ")
    return version, set(filter(None, entries.split(",")))


class BuilderConfig:
    def __init__(self, module):
        self.module = module
        self.flags = {module.BuilderFlag.TF32}  # TensorRT's default: TF32 on
        self.pools, self.profiles, self.cache = {}, [], None
        self.profiling_verbosity = None
        self.DLA_core = -1
        self.default_device_type = module.DeviceType.GPU

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool, 1 << 40)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, data):
        version, entries = parse_cache(bytes(data))
        return TimingCache(version or self.module.__version__, entries)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.module.calls.append(("set_timing_cache", sorted(cache.entries)))
        if cache.version != self.module.__version__ and not ignore_mismatch:
            self.cache = None  # what TensorRT then holds is not documented: the worst case
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, module, logger):
        self.module = module

    def create_network(self, flags=0):
        network = Network(self.module, flags)
        self.module.networks.append(network)
        return network

    def create_builder_config(self):
        config = BuilderConfig(self.module)
        self.module.configs.append(config)
        return config

    def create_optimization_profile(self):
        return OptimizationProfile()

    def build_serialized_network(self, network, config):
        m = self.module
        m.calls.append(("build", network, config))
        if m.build_fails:
            return None
        m.builds += 1
        if config.cache is not None:
            config.cache.entries.add(f"tactic{m.builds}")
        if m.on_build:
            m.on_build()
        return b"ENGINE " + m.__version__.encode()


# -- runtime -------------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, module, profile):
        self.module, self.profile = module, profile
        self.names = ["pixel_values", "class_queries_logits", "masks_queries_logits"]

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.module.TensorIOMode.INPUT if name == "pixel_values" else self.module.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def get_tensor_profile_shape(self, name, index):
        return self.profile

    def create_execution_context(self):
        return Context(self.module)


class Context:
    """Checks, when run, that every tensor has an address and the input's device buffer holds the input."""

    def __init__(self, module):
        self.module, self.shape, self.addresses = module, None, {}

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b, _, h, w = self.shape
        return (b, 5, 4) if name == "class_queries_logits" else (b, 4, h // 4, w // 4)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        arrays = self.module.device_arrays
        for name in ("pixel_values", "class_queries_logits", "masks_queries_logits"):
            buffer = arrays[self.addresses[name]]
            expected = self.shape if name == "pixel_values" else self.get_tensor_shape(name)
            assert buffer.allocated >= int(np.prod(expected)), f"{name}: device buffer too small"
            if name != "pixel_values":
                buffer.data = np.full(expected, arrays[self.addresses["pixel_values"]].data.mean(), np.float32)
        return True


class Runtime:
    def __init__(self, module, logger):
        self.module = module

    def deserialize_cuda_engine(self, data):
        if not bytes(data).startswith(b"ENGINE"):
            return None
        return Engine(self.module, self.module.engine_profile)


def make(version="10.3.0", *, parse_error=None, int8_graph=False, build_fails=False):
    """A fake ``tensorrt`` module of ``version``: 11.x without weak typing, 10.x with it (deprecated from 10.12)."""
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.__file__ = __file__
    major = int(version.split(".")[0])
    m.weak = major < 11
    m.parse_error, m.int8_graph, m.build_fails = parse_error, int8_graph, build_fails
    m.calls, m.networks, m.configs, m.plugins_initialized = [], [], [], 0
    m.device_arrays, m.builds, m.on_build = {}, 0, None
    m.engine_profile = ((1, 3, 64, 96), (2, 3, 64, 96), (3, 3, 64, 96))
    flags = (WEAK_FLAGS if m.weak else ()) + COMMON_FLAGS
    m.BuilderFlag = enum.IntEnum("BuilderFlag", list(flags), start=0)
    m.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"], start=1)
    m.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"], start=0)
    m.DeviceType = enum.IntEnum("DeviceType", ["GPU", "DLA"], start=0)
    m.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "DETAILED"], start=0)
    m.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", ["NATIVE_INSTANCENORM"], start=0)
    m.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], start=0)
    m.LayerType, m.DataType = LayerType, DataType
    m.float32, m.float16, m.int8, m.int32, m.int64 = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64,
    )  # fmt: skip
    m.ILayer = WeakLayer if m.weak else StrongLayer

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=2):
            self.severity = severity

    def init_libnvinfer_plugins(logger, namespace):
        m.plugins_initialized += 1
        return True

    m.ILogger, m.Logger, m.init_libnvinfer_plugins = ILogger, Logger, init_libnvinfer_plugins
    m.Builder = lambda logger: Builder(m, logger)
    m.OnnxParser = OnnxParser
    m.Runtime = lambda logger: Runtime(m, logger)
    m.nptype = lambda dtype: {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[dtype]
    return m


# -- Polygraphy's CUDA helpers ---------------------------------------------------------------------------------------
def make_cuda(module):
    """``polygraphy.cuda`` as our runner uses it; ``copy_from`` refuses a host array larger than the device array,
    as Polygraphy's does."""
    counter = iter(range(1, 1 << 30))

    class DeviceArray:
        def __init__(self, shape=(0,), dtype=np.float32):
            self.ptr, self.shape, self.allocated, self.data = next(counter), tuple(shape), 0, None
            module.device_arrays[self.ptr] = self
            self.resize(self.shape)

        def resize(self, shape):
            self.shape = tuple(shape)
            need = int(np.prod(shape))
            if need > self.allocated:
                del module.device_arrays[self.ptr]
                self.ptr, self.allocated = next(counter), need
                module.device_arrays[self.ptr] = self
            return self

        def copy_from(self, host, stream=None):
            if host.size > self.allocated:
                raise AssertionError(f"copy_from: {host.size} values into a device array of {self.allocated}")
            self.data = host.copy()
            return self

        def copy_to(self, host, stream=None):
            host[...] = self.data
            return host

        def free(self):
            module.calls.append(("free", self.ptr))

    class Stream:
        ptr = 7

        def synchronize(self):
            pass

        def free(self):
            module.calls.append(("free stream",))

    return types.SimpleNamespace(DeviceArray=DeviceArray, Stream=Stream)
