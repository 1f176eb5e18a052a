"""The KubeRay RayService example: valid YAML, a serve config Ray's own schema accepts, an import path and flags that
resolve in this package, GPUs and the engine cache consistent between the deployment and the worker pods."""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml

import kontext_trt.serve

EXAMPLE = Path(kontext_trt.serve.__file__).with_name("kuberay-rayservice.yaml")


def test_rayservice_example_is_consistent():
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from kontext_trt.cli.main import build_parser
    from kontext_trt.serve.ray_app import KontextDeployment

    spec = yaml.safe_load(EXAMPLE.read_text())
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayService"
    config = yaml.safe_load(spec["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # raises on any field Ray Serve would refuse
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    built = builder(app["args"])
    assert isinstance(built, serve.Application)

    args = build_parser().parse_args(["serve", *app["args"]["flags"].split()])
    (deployment,) = app["deployments"]
    assert deployment["name"] == KontextDeployment.name
    assert deployment["autoscaling_config"]["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
    assert args.max_batch <= deployment["max_ongoing_requests"]
    # a replica must hold the requests it answers 429 for itself (past max batch + --max-queue), before Ray queues
    assert args.max_batch + args.max_queue < deployment["max_ongoing_requests"]

    (workers,) = spec["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == deployment["ray_actor_options"]["num_gpus"]
    assert int(container["resources"]["limits"]["cpu"]) >= deployment["ray_actor_options"]["num_cpus"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    assert any(args.engines.is_relative_to(path) for path in mounts.values())
    assert workers["maxReplicas"] >= deployment["autoscaling_config"]["max_replicas"]
