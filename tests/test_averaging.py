"""Weight averaging (engines/averaging.py): the average's arithmetic, the swap around validation, the
checkpoint state, and what happens on an error."""

import pytest
import torch
from ignite.engine import Engine, Events

from anatomy_vlp_bundle.engines.averaging import WeightAverage


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    return net


def test_average_follows_the_warmed_up_decay_and_leaves_buffers_alone():
    net = _net()
    ema = WeightAverage(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    ema.update()  # first update builds the shadow, then moves it with d = min(0.9, 1/10)
    torch.testing.assert_close(ema.shadow["0.weight"], w0)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()  # d = min(0.9, 2 / 11)
    d = 2.0 / 11.0
    torch.testing.assert_close(ema.shadow["0.weight"], w0 + (1 - d) * 1.0)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # no running_mean / num_batches_tracked
    for _ in range(200):
        ema.update()
    # long after the warm-up the decay is the configured one and the average has reached the live weights
    torch.testing.assert_close(ema.shadow["0.weight"], net[0].weight.detach(), atol=1e-6, rtol=0)


def test_validation_sees_the_average_and_training_gets_its_weights_back():
    net = _net()
    ema = WeightAverage(net, decay=0.5)
    trainer = Engine(lambda e, b: None)
    evaluator = Engine(lambda e, b: net[0].weight.detach().clone())
    seen = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
    ema.attach(trainer, evaluator)
    trainer.run([0])  # one update: the shadow is the initial weights
    initial = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    live = net[0].weight.detach().clone()
    evaluator.run([0, 1])
    assert all(torch.equal(s, initial) for s in seen)  # validation ran on the averaged weights
    assert torch.equal(net[0].weight, live) and not ema.swapped  # and training continues on its own


def test_an_error_during_validation_restores_the_live_weights():
    net = _net()
    ema = WeightAverage(net, decay=0.5)
    ema.update()
    with torch.no_grad():
        net[0].weight.add_(2.0)
    live = net[0].weight.detach().clone()

    def boom(engine, batch):
        raise RuntimeError("bad batch")

    evaluator = Engine(boom)
    ema.attach(Engine(lambda e, b: None), evaluator)
    with pytest.raises(RuntimeError, match="bad batch"):
        evaluator.run([0])
    assert torch.equal(net[0].weight, live) and not ema.swapped


def test_state_round_trip_and_mismatch_errors(tmp_path):
    net = _net()
    ema = WeightAverage(net, decay=0.99)
    for _ in range(3):
        ema.update()
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = WeightAverage(_net(), decay=0.99)
    other.load_state_dict(state)
    assert other.updates == 3 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    wrong = WeightAverage(torch.nn.Linear(3, 4), decay=0.99)
    with pytest.raises(ValueError, match="do not match"):
        wrong.load_state_dict(state)
    # a checkpoint without an average: the average restarts from the loaded weights at the next update
    fresh = WeightAverage(_net(), decay=0.99)
    fresh.load_state_dict(WeightAverage(_net(), decay=0.0).state_dict())
    assert fresh.shadow == {} and fresh.updates == 0


def test_off_is_a_no_op_and_bad_settings_are_refused():
    net = _net()
    ema = WeightAverage(net, decay=0.0)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    ema.attach(trainer, evaluator)
    trainer.run([0, 1])
    assert ema.shadow == {} and ema.updates == 0
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)
    with pytest.raises(ValueError, match="every"):
        WeightAverage(net, decay=0.5, every=0)
