"""The wall clock watched against a steady one: steps noticed, drift ignored (fake clocks)."""

from __future__ import annotations

from cio_logging.clock import WallClock


class FakeClocks:
    """A wall and a steady clock that the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.steady = 5_000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.steady += seconds

    def clock(self) -> WallClock:
        return WallClock(wall=lambda: self.wall, steady=lambda: self.steady)


class TestWallClock:
    """Steps of the wall clock, as the delivering worker sees them."""

    def test_reads_the_wall_clock(self) -> None:
        """A reading is the wall clock, stepped or not: due times are wall-clock times."""
        fake = FakeClocks()
        clock = fake.clock()
        assert clock() == fake.wall
        fake.wall -= 3600
        assert clock() == fake.wall

    def test_a_step_back_is_taken_once(self) -> None:
        """take_step() gives the net step since it was last called, then zero."""
        fake = FakeClocks()
        clock = fake.clock()
        fake.advance(10)
        fake.wall -= 3600
        fake.advance(5)
        assert clock.take_step() == -3600
        assert clock.take_step() == 0

    def test_a_step_between_two_takes_is_noticed_without_another_reading(self) -> None:
        """The step is measured at take_step() itself, not only at the readings before."""
        fake = FakeClocks()
        clock = fake.clock()
        fake.wall += 600
        assert clock.take_step() == 600

    def test_slow_drift_is_not_a_step(self) -> None:
        """NTP slewing (here 500 ppm over an hour, in steps of a minute) moves nothing."""
        fake = FakeClocks()
        clock = fake.clock()
        for _ in range(60):
            fake.advance(60)
            fake.wall += 60 * 0.0005
            clock()
        assert clock.take_step() == 0

    def test_forward_steps_are_not_counted_as_age(self) -> None:
        """A forward step counts for moments before it, not after it; a back step never."""
        fake = FakeClocks()
        clock = fake.clock()
        before = fake.wall
        fake.advance(1)
        fake.wall += 4 * 86400
        clock()
        after = fake.wall
        fake.wall -= 3600
        clock()
        assert clock.uncounted_since(before) == 4 * 86400
        assert clock.uncounted_since(after) == 0
