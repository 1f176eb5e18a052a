"""The TensorRT Python binding names this project uses, per flavour (the table beside engines/fake_trt.py).

DATACENTER: every datacenter TensorRT name engines/ or its fakes use, as (first release that has it, first release
without it or None). Read from NVIDIA's Python bindings in github.com/NVIDIA/TensorRT at each release tag from 8.0.1
(the oldest with python/src) to v11.1: python/src/infer/pyCore.cpp (runtime, builder, config, refitter, logger),
pyGraph.cpp (network, layers, IAttention), pyFoundationalTypes.cpp (DataType, Weights), parsers/pyOnnx.cpp
(OnnxParser); "8.0" means 8.0 or earlier. Where a name's meaning matters, the header or docs are cited beside it.
TensorRT-RTX has no table: tests/engines/test_fake_conformance.py reads the installed `tensorrt_rtx` module itself.

USED: every name kontext_trt/engines/*.py reaches on a TensorRT object, with the flavours whose code path reaches it
(test_fake_conformance keeps it in sync with the code by an AST scan, and checks each against those flavours).
Keys are dotted paths from the module: "ICudaEngine.device_memory_size_v2", "BuilderFlag.TF32".
"""
from __future__ import annotations

TRT, RTX = "tensorrt", "tensorrt-rtx"
BOTH = (TRT, RTX)
FLOOR = {TRT: (10, 14)}  # engines/trt_api.MIN_VERSIONS: the oldest datacenter release the code must run on

DATACENTER: dict[str, tuple[str, str | None]] = {
    # module-level classes
    "Builder": ("8.0", None), "OnnxParser": ("8.0", None), "Runtime": ("8.0", None), "Refitter": ("8.0", None),
    "Weights": ("8.0", None), "ICudaEngine": ("8.0", None), "IExecutionContext": ("8.0", None),
    "IBuilderConfig": ("8.0", None), "IOptimizationProfile": ("8.0", None), "INetworkDefinition": ("8.0", None),
    "ITimingCache": ("8.0", None), "ILayer": ("8.0", None),
    "ILogger": ("8.0", None),  # pyCore.cpp: `py::class_<ILogger, PyLogger> baseLoggerBinding{m, "ILogger", ...}`
    "IProgressMonitor": ("9.1", None),
    "IAttention": ("10.14", None), "IAttentionOutputLayer": ("10.14", None),  # pyGraph.cpp: ONNX Attention (opset 23)
    "IRuntimeConfig": ("10.11", None),
    # overridden by engines/trt_api's Logger and Monitor
    "ILogger.log": ("8.0", None),
    "IProgressMonitor.phase_start": ("9.1", None), "IProgressMonitor.step_complete": ("9.1", None),
    "IProgressMonitor.phase_finish": ("9.1", None),
    # enums
    "ILogger.Severity": ("8.0", None), "ILogger.Severity.INTERNAL_ERROR": ("8.0", None),
    "ILogger.Severity.ERROR": ("8.0", None), "ILogger.Severity.WARNING": ("8.0", None),
    "ILogger.Severity.INFO": ("8.0", None), "ILogger.Severity.VERBOSE": ("8.0", None),
    "BuilderFlag": ("8.0", None), "BuilderFlag.TF32": ("8.0", None), "BuilderFlag.REFIT": ("8.0", None),
    "BuilderFlag.REFIT_INDIVIDUAL": ("10.2", None), "BuilderFlag.WEIGHT_STREAMING": ("10.0", None),
    # TensorRT 11 builds strongly typed networks only: the precision flags are gone from pyCore.cpp in v11.0
    "BuilderFlag.FP16": ("8.0", "11.0"), "BuilderFlag.BF16": ("9.1", "11.0"), "BuilderFlag.INT8": ("8.0", "11.0"),
    "BuilderFlag.FP8": ("8.6", "11.0"),
    "NetworkDefinitionCreationFlag": ("8.0", None),
    # v11.1 pyCore.cpp keeps the value, marked "Deprecated: always enabled"; trt_api does not pass it on 11
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": ("9.1", None),
    "LayerType": ("8.0", None), "LayerType.ATTENTION_OUTPUT": ("10.14", None),
    "TensorIOMode": ("8.5", None), "TensorIOMode.NONE": ("8.5", None), "TensorIOMode.INPUT": ("8.5", None),
    "TensorIOMode.OUTPUT": ("8.5", None),
    "ExecutionContextAllocationStrategy": ("10.0", None), "ExecutionContextAllocationStrategy.STATIC": ("10.0", None),
    "ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE": ("10.0", None),
    "ExecutionContextAllocationStrategy.USER_MANAGED": ("10.0", None),
    "DataType": ("8.0", None), "DataType.FLOAT": ("8.0", None), "DataType.HALF": ("8.0", None),
    "DataType.BF16": ("9.1", None), "DataType.INT8": ("8.0", None), "DataType.INT32": ("8.0", None),
    "DataType.INT64": ("9.1", None), "DataType.BOOL": ("8.0", None), "DataType.UINT8": ("8.5", None),
    "EngineStat": ("10.14", None), "EngineStat.TOTAL_WEIGHTS_SIZE": ("10.14", None),
    "EngineStat.STRIPPED_WEIGHTS_SIZE": ("10.14", None),
    # builder
    "Builder.create_network": ("8.0", None), "Builder.create_builder_config": ("8.0", None),
    "Builder.create_optimization_profile": ("8.0", None), "Builder.build_serialized_network": ("8.0", None),
    "INetworkDefinition.num_layers": ("8.0", None), "INetworkDefinition.get_layer": ("8.0", None),
    "INetworkDefinition.mark_weights_refittable": ("10.2", None),
    "ILayer.type": ("8.0", None),
    "IAttentionOutputLayer.attention": ("10.14", None),  # pyGraph.cpp: IAttentionBoundaryLayer's, inherited
    "IAttention.decomposable": ("10.14", None),
    "OnnxParser.parse_from_file": ("8.0", None), "OnnxParser.num_errors": ("8.0", None),
    "OnnxParser.get_error": ("8.0", None),
    "IBuilderConfig.set_flag": ("8.0", None), "IBuilderConfig.clear_flag": ("8.0", None),
    "IBuilderConfig.progress_monitor": ("9.1", None), "IBuilderConfig.add_optimization_profile": ("8.0", None),
    "IBuilderConfig.builder_optimization_level": ("8.6", None), "IBuilderConfig.set_timing_cache": ("8.0", None),
    "IBuilderConfig.create_timing_cache": ("8.0", None), "IBuilderConfig.get_timing_cache": ("8.0", None),
    "ITimingCache.serialize": ("8.0", None),
    "IOptimizationProfile.set_shape": ("8.0", None),
    # runtime
    "Runtime.deserialize_cuda_engine": ("8.0", None),
    "ICudaEngine.device_memory_size_v2": ("10.1", None), "ICudaEngine.num_io_tensors": ("8.5", None),
    "ICudaEngine.get_tensor_name": ("8.5", None), "ICudaEngine.get_tensor_mode": ("8.5", None),
    "ICudaEngine.get_tensor_dtype": ("8.5", None), "ICudaEngine.get_tensor_shape": ("8.5", None),
    "ICudaEngine.get_tensor_profile_shape": ("8.5", None),
    # weight streaming (V2 API, docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/weight-streaming.html)
    "ICudaEngine.streamable_weights_size": ("10.0", None), "ICudaEngine.weight_streaming_budget_v2": ("10.1", None),
    "ICudaEngine.create_execution_context": ("8.0", None),
    "ICudaEngine.get_engine_stat": ("10.14", None),
    "ICudaEngine.create_runtime_config": ("10.11", None),
    "IExecutionContext.set_device_memory": ("10.1", None),  # (memory, size): setDeviceMemoryV2
    "IExecutionContext.set_input_shape": ("8.5", None), "IExecutionContext.set_tensor_address": ("8.5", None),
    "IExecutionContext.get_tensor_shape": ("8.5", None), "IExecutionContext.execute_async_v3": ("8.5", None),
    # IExecutionContext.is_stream_capturable: absent from every release (TensorRT-RTX 1.2 added it, release notes:
    # docs.nvidia.com/deeplearning/tensorrt-rtx/1.2/getting-started/release-notes.html)
    "Refitter.set_named_weights": ("8.0", None), "Refitter.get_missing_weights": ("8.0", None),
    "Refitter.refit_cuda_engine_async": ("9.1", None), "Refitter.unset_named_weights": ("9.1", None),
    "Refitter.get_all_weights": ("8.0", None),
    "Weights.dtype": ("8.0", None), "Weights.size": ("8.0", None), "Weights.nbytes": ("8.0", None),
}

USED: dict[str, tuple[str, ...]] = {
    "Builder": BOTH, "OnnxParser": BOTH, "Runtime": BOTH, "Refitter": BOTH, "Weights": BOTH, "ILogger": BOTH,
    "IProgressMonitor": BOTH, "IAttentionOutputLayer": BOTH,
    "ILogger.log": BOTH, "ILogger.Severity.ERROR": BOTH,
    "IProgressMonitor.phase_start": BOTH, "IProgressMonitor.step_complete": BOTH,
    "IProgressMonitor.phase_finish": BOTH,
    "BuilderFlag": BOTH, "BuilderFlag.TF32": BOTH, "BuilderFlag.REFIT_INDIVIDUAL": BOTH,
    "BuilderFlag.WEIGHT_STREAMING": BOTH, "BuilderFlag.REQUIRE_USER_ALLOCATION": (RTX,),
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": BOTH,
    "LayerType": BOTH, "LayerType.ATTENTION_OUTPUT": BOTH,
    "ExecutionContextAllocationStrategy.STATIC": BOTH, "ExecutionContextAllocationStrategy.USER_MANAGED": BOTH,
    "DataType.FLOAT": BOTH, "DataType.HALF": BOTH, "DataType.BF16": BOTH,
    "EngineStat.TOTAL_WEIGHTS_SIZE": BOTH,
    "ComputeCapability": (RTX,), "EngineInvalidityDiagnostics": (RTX,),
    "DynamicShapesKernelSpecializationStrategy.EAGER": (RTX,), "CudaGraphStrategy.WHOLE_GRAPH_CAPTURE": (RTX,),
    "Builder.create_network": BOTH, "Builder.create_builder_config": BOTH,
    "Builder.create_optimization_profile": BOTH, "Builder.build_serialized_network": BOTH,
    "INetworkDefinition.num_layers": BOTH, "INetworkDefinition.get_layer": BOTH,
    "INetworkDefinition.mark_weights_refittable": BOTH,
    "ILayer.type": BOTH, "IAttentionOutputLayer.attention": BOTH, "IAttention.decomposable": BOTH,
    "OnnxParser.parse_from_file": BOTH, "OnnxParser.num_errors": BOTH, "OnnxParser.get_error": BOTH,
    "IBuilderConfig.set_flag": BOTH, "IBuilderConfig.clear_flag": BOTH, "IBuilderConfig.progress_monitor": BOTH,
    "IBuilderConfig.add_optimization_profile": BOTH, "IBuilderConfig.builder_optimization_level": BOTH,
    "IBuilderConfig.num_compute_capabilities": (RTX,), "IBuilderConfig.set_compute_capability": (RTX,),
    "IBuilderConfig.set_timing_cache": (TRT,), "IBuilderConfig.create_timing_cache": (TRT,),
    "IBuilderConfig.get_timing_cache": (TRT,), "ITimingCache.serialize": (TRT,),
    "IOptimizationProfile.set_shape": BOTH,
    "Runtime.deserialize_cuda_engine": BOTH, "Runtime.get_engine_validity": (RTX,),
    "Runtime.engine_header_size": (RTX,),
    "ICudaEngine.device_memory_size_v2": BOTH, "ICudaEngine.num_io_tensors": BOTH,
    "ICudaEngine.get_tensor_name": BOTH, "ICudaEngine.get_tensor_mode": BOTH, "ICudaEngine.get_tensor_dtype": BOTH,
    "ICudaEngine.get_tensor_shape": BOTH, "ICudaEngine.get_tensor_profile_shape": BOTH,
    "ICudaEngine.streamable_weights_size": BOTH, "ICudaEngine.weight_streaming_budget_v2": BOTH,
    "ICudaEngine.create_execution_context": BOTH, "ICudaEngine.get_engine_stat": BOTH,
    "ICudaEngine.create_runtime_config": (RTX,),
    "IRuntimeConfig.set_execution_context_allocation_strategy": (RTX,),
    "IRuntimeConfig.dynamic_shapes_kernel_specialization_strategy": (RTX,),
    "IRuntimeConfig.cuda_graph_strategy": (RTX,), "IRuntimeConfig.create_runtime_cache": (RTX,),
    "IRuntimeConfig.set_runtime_cache": (RTX,), "IRuntimeCache.deserialize": (RTX,),
    "IRuntimeCache.serialize": (RTX,),
    "IExecutionContext.set_device_memory": BOTH, "IExecutionContext.set_input_shape": BOTH,
    "IExecutionContext.set_tensor_address": BOTH, "IExecutionContext.get_tensor_shape": BOTH,
    "IExecutionContext.execute_async_v3": BOTH, "IExecutionContext.is_stream_capturable": (RTX,),
    "Refitter.set_named_weights": BOTH, "Refitter.get_missing_weights": BOTH,
    "Refitter.refit_cuda_engine_async": BOTH, "Refitter.unset_named_weights": BOTH,
    "Refitter.get_all_weights": BOTH,
}


def version(text: str) -> tuple[int, ...]:
    """'10.14' -> (10, 14)."""
    return tuple(int(part) for part in text.split("."))


def datacenter_has(name: str, at: tuple[int, ...], table: dict | None = None) -> bool:
    """Whether datacenter TensorRT `at` (e.g. (10, 14)) and every later release up to the newest in the table has
    `name`."""
    entry = (DATACENTER if table is None else table).get(name)
    return entry is not None and version(entry[0]) <= at[:2] and entry[1] is None


def datacenter_has_at(name: str, at: tuple[int, ...], table: dict | None = None) -> bool:
    """Whether datacenter TensorRT release `at` has `name` (for a fake of that version)."""
    entry = (DATACENTER if table is None else table).get(name)
    return entry is not None and version(entry[0]) <= at[:2] and (entry[1] is None or at[:2] < version(entry[1]))
