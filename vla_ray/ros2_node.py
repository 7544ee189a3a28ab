"""The rclpy node of ``vla-ray ros2-bridge`` (needs a ROS 2 install: ``rclpy``, ``sensor_msgs``,
``std_msgs``). Every decision is ``vla_ray.ros2_bridge``'s; this module only subscribes, spins
and publishes."""

from __future__ import annotations

from typing import Any

import numpy as np

from vla_ray.ros2_bridge import BridgeConfig, BridgeCore, ControlRate, Policy, run_loop


def message_class(msg_type: str) -> Any:
    """The rclpy message class of ``pkg/msg/Type``."""
    import importlib

    pkg, _, name = msg_type.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


def make_node(config: BridgeConfig, policy: Policy, name: str = "vla_ray_bridge") -> Any:
    """A started node (``rclpy.init`` called by the caller) with its subscriptions, its action
    publisher and its :class:`BridgeCore` (``node.core``) on the node's clock."""
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data

    node = Node(name)

    def clock() -> float:
        return node.get_clock().now().nanoseconds * 1e-9

    core = BridgeCore(config, policy, clock)
    node.core = core
    for role, spec in config.subscriptions():
        qos = qos_profile_sensor_data if role == "image" else 10
        node.create_subscription(
            message_class(spec.type),
            spec.topic,
            lambda msg, role=role, spec=spec: core.on_message(role, spec, msg),
            qos,
        )
    action_cls = message_class(config.action.type)
    publisher = node.create_publisher(action_cls, config.action.topic, 10)

    def publish(action: np.ndarray) -> None:
        msg = action_cls()
        msg.data = [float(x) for x in action]
        publisher.publish(msg)

    node.publish_action = publish
    node.clock_seconds = clock
    return node


def spin(config: BridgeConfig, policy: Policy, max_seconds: float | None = None) -> dict:
    """Run the bridge until Ctrl-C (or ``max_seconds``); returns its counts."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    node = make_node(config, policy)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    rate = ControlRate(config.rate_hz, node.clock_seconds)
    start = node.clock_seconds()
    try:
        run_loop(
            node.core,
            rate,
            node.publish_action,
            lambda seconds: executor.spin_once(timeout_sec=max(seconds, 1e-4)),
            lambda: (
                rclpy.ok() and (max_seconds is None or node.clock_seconds() - start < max_seconds)
            ),
        )
    except KeyboardInterrupt:
        pass
    finally:
        stats = node.core.stats
        executor.remove_node(node)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return {
        "ticks": stats.ticks,
        "model_calls": stats.model_calls,
        "interventions": stats.interventions,
        "overruns": rate.overruns,
    }
