"""The scheduler process: requests in, step plans out (up to `steps_ahead` in flight), results in."""

from __future__ import annotations

import logging
import sys
import time
import traceback

import zmq

from toka import protocol
from toka.cluster import plan_publisher
from toka.config import EngineConfig
from toka.fabric import Channel, leave_stop_signals_to_launcher, run_measured, setup_logging, watch_parent
from toka.scheduler.batching import Scheduler

log = logging.getLogger("toka.scheduler")

STATS_INTERVAL = 0.5  # seconds between Stats messages to the server while busy


def scheduler_main(cfg: EngineConfig) -> None:
    leave_stop_signals_to_launcher()
    watch_parent()
    name = cfg.process_name("scheduler")
    setup_logging(name, cfg.log_level)
    ctx = zmq.Context()
    control = Channel(ctx, zmq.PUSH, cfg.endpoint("control"), None, bind=False)
    try:
        requests = Channel(ctx, zmq.PULL, cfg.endpoint("requests"), protocol.RequestMsg, bind=True)
        plans = plan_publisher(ctx, cfg)
        events = Channel(ctx, zmq.SUB, cfg.endpoint("events"), protocol.EventMsg, bind=False, key=cfg.cluster_key)
        status = Channel(ctx, zmq.PUSH, cfg.endpoint("status"), None, bind=False)
        plans.wait_subscribers(cfg.ranks, timeout=60, name="plans")
        control.send(protocol.Ready(name))
        sched = Scheduler(cfg.num_pages, cfg.page_size, cfg.max_seqs, cfg.max_tokens_per_forward,
                          prefix_caching=cfg.prefix_caching, hydragen=cfg.hydragen_groups, stages=cfg.pp)
        run_measured(name, Loop(cfg, sched, requests, plans, events, status).run)
    except Exception as e:
        log.error("scheduler failed: %s", traceback.format_exc())
        control.send(protocol.Fatal(name, f"{type(e).__name__}: {e}"))
        control.sock.close(linger=2000)
        sys.exit(1)
    log.info("scheduler stopped")


class Loop:
    def __init__(self, cfg, sched: Scheduler, requests, plans, events, status):
        self.cfg, self.sched = cfg, sched
        self.requests, self.plans, self.events, self.status = requests, plans, events, status
        self.poller = zmq.Poller()
        self.poller.register(requests.sock, zmq.POLLIN)
        self.poller.register(events.sock, zmq.POLLIN)
        self.draining = False
        self.last_stats = 0.0
        self.last_progress = time.monotonic()
        self.planning = self.updating = 0.0  # host seconds in schedule() / update()

    def run(self) -> dict:
        """Until the drain is done; returns the steps planned and the host seconds spent planning
        and taking results."""
        while True:
            for msg in self.requests.recv_all():
                self.on_request(msg)
            t0 = time.perf_counter()
            for result in self.events.recv_all():
                self.sched.update(result)
                self.last_progress = time.monotonic()
            t1 = time.perf_counter()
            self.updating += t1 - t0
            if self.draining and self.sched.idle:
                self.plans.send(protocol.Stop(self.sched.next_step))
                if steps := self.sched.next_step:
                    log.info("%d steps: planning %.2f ms a step, taking results %.2f ms a step", steps,
                             self.planning / steps * 1e3, self.updating / steps * 1e3)
                return dict(steps=self.sched.next_step, planning_s=self.planning, results_s=self.updating)
            while self.sched.inflight_steps < self.cfg.steps_in_flight:
                plan = self.sched.schedule()
                if plan is None:
                    break
                if self.sched.inflight_steps == 1:  # the ranks were idle: the hang clock starts now
                    self.last_progress = time.monotonic()
                self.plans.send(plan)
            self.planning += time.perf_counter() - t1
            self.publish_stats()
            if self.sched.inflight_steps and time.monotonic() - self.last_progress > self.cfg.step_timeout:
                raise TimeoutError(f"no step finished in {self.cfg.step_timeout:.0f}s: the ranks are hung")
            # wake often enough to notice a hung step soon after --step-timeout
            wait = min(1.0, self.cfg.step_timeout / 4) if self.sched.inflight_steps or not self.sched.idle else 0.2
            self.poller.poll(int(wait * 1000))

    def on_request(self, msg) -> None:
        if isinstance(msg, protocol.Submit):
            self.sched.add(msg.rid, msg.prompt, msg.params, msg.n)
        elif isinstance(msg, protocol.Abort):
            self.sched.abort(msg.rid)
        elif isinstance(msg, protocol.Drain):
            self.draining = True

    def publish_stats(self) -> None:
        now = time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL:
            self.last_stats = now
            self.status.send(self.sched.stats())
