defmodule Kuma.Projection.FailureTest do
  # Kuma.Projection.Failure decides what a failed event leads to, as data: no SQLite, no
  # timers, no processes.
  use ExUnit.Case, async: true

  alias Kuma.Projection.Failure

  @event %{shard: 2, position: 17, entity_id: "acct-1", seq: 4, type: "Deposited"}
  @policy %{max_retries: 2, retry_backoff: 100, on_error: :park}

  test "retries with exponential backoff, then parks" do
    {:retry, 100, f1} = Failure.decide(nil, @event, :boom, @policy)
    assert %Failure{attempts: 1, shard: 2, position: 17, entity_id: "acct-1", seq: 4, error: :boom} = f1
    {:retry, 200, f2} = Failure.decide(f1, @event, :boom, @policy)
    assert f2.attempts == 2
    assert {:park, %Failure{attempts: 3}} = Failure.decide(f2, @event, :boom, @policy)
  end

  test "on_error: :stop stops instead of parking; max_retries: 0 decides at once" do
    assert {:stop, %Failure{attempts: 1}} =
             Failure.decide(nil, @event, :boom, %{@policy | max_retries: 0, on_error: :stop})

    assert {:park, %Failure{attempts: 1}} = Failure.decide(nil, @event, :boom, %{@policy | max_retries: 0})
  end

  test "attempts count per event: a failure of another event starts at 1" do
    {:retry, _, f1} = Failure.decide(nil, @event, :boom, @policy)
    other_shard = %{@event | shard: 3}
    other_position = %{@event | position: 18}
    assert {:retry, 100, %Failure{attempts: 1}} = Failure.decide(f1, other_shard, :boom, @policy)
    assert {:retry, 100, %Failure{attempts: 1}} = Failure.decide(f1, other_position, :boom, @policy)
  end

  test "backoff is capped at 30 s" do
    assert Failure.backoff(100, 1) == 100
    assert Failure.backoff(100, 5) == 1_600
    assert Failure.backoff(100, 20) == 30_000
  end

  test "a failure forgets its erased entity's id and type, not another's" do
    {:retry, _, f} = Failure.decide(nil, @event, {:raised, "boom"}, @policy)
    assert Failure.forgotten(f, "someone-else") == f
    forgotten = Failure.forgotten(f, "acct-1")
    assert %Failure{entity_id: nil, type: nil, error: :entity_erased, seq: 4, position: 17} = forgotten
    refute inspect(forgotten) =~ "acct-1"
    assert Failure.forgotten(nil, "acct-1") == nil
  end

  test "what status shows" do
    {:retry, _, f} = Failure.decide(nil, @event, :boom, @policy)
    assert Failure.public(f) == %{shard: 2, position: 17, entity_id: "acct-1", seq: 4, attempts: 1, error: :boom}
    assert Failure.public(nil) == nil
    assert Failure.public(%{error: :init_failed}) == %{error: :init_failed}
  end
end
