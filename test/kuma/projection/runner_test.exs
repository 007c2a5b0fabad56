defmodule Kuma.Projection.RunnerTest do
  use Kuma.StoreCase, async: false

  import ExUnit.CaptureLog
  import Kuma.Test.ProjectionHelpers

  alias Kuma.{Position, Projection, ReadModel}
  alias Kuma.Test.{Collector, Counter, SlowCounter}

  test "no event is skipped or doubled while many processes append concurrently", %{store: store} do
    {:ok, _} = ReadModel.start(store, Counter, name: :counter, batch_size: 37)
    {:ok, _} = Projection.start(store, Collector, name: :collector, args: self(), checkpoint: :memory)

    tokens =
      1..24
      |> Task.async_stream(
        fn w ->
          Enum.reduce(1..60, %{}, fn i, token ->
            id = "acct-#{rem(w * 7 + i, 40)}"

            {:ok, _seq, t} =
              if rem(i, 3) == 0,
                do: Kuma.append(Kuma.entity(store, id), [{:tick, w, i}], return: :token),
                else: Kuma.append(store, id, [{:tick, w, i}, {:tock, w, i}], return: :token)

            Position.merge(token, t)
          end)
        end,
        max_concurrency: 24,
        timeout: 60_000
      )
      |> Enum.reduce(%{}, fn {:ok, t}, acc -> Position.merge(acc, t) end)

    assert :ok = Projection.wait_for(:counter, tokens, 30_000)
    assert :ok = Projection.wait_for(:collector, tokens, 30_000)

    stored = for n <- 0..39, id = "acct-#{n}", {:ok, events} = Kuma.events(store, id), e <- events, do: {id, e.seq}

    assert length(stored) == 24 * 60 + 24 * 40
    assert [[total]] = rows(:counter, "SELECT sum(n) FROM counts")
    assert total == length(stored), "every event counted once"
    seen = rows(:counter, "SELECT entity_id, seq FROM seen") |> Enum.map(fn [id, seq] -> {id, seq} end)
    assert Enum.sort(seen) == Enum.sort(stored)

    projected = drain(:projected)
    assert length(projected) == length(stored)
    # Per shard, positions arrive strictly increasing: commit order, no gaps skipped over.
    for {_shard, envs} <- Enum.group_by(projected, & &1.shard) do
      positions = Enum.map(envs, & &1.position)
      assert positions == Enum.sort(positions) and positions == Enum.uniq(positions)
    end

    assert {:ok, %{status: :live, lag: 0, parked: 0}} = Projection.status(:counter)
  end

  describe "failing events" do
    test "are retried with backoff, then parked, and the projection goes on", %{store: store} do
      {:ok, _} = Projection.start(store, Collector, name: :parking, args: self(), max_retries: 2, retry_backoff: 5)

      log =
        capture_log(fn ->
          {:ok, 1} = Kuma.append(store, "a", :fine)
          {:ok, 2} = Kuma.append(store, "a", :poison)
          {:ok, 3, token} = Kuma.append(store, "a", :after, return: :token)
          assert :ok = Projection.wait_for(:parking, token, 5_000)
        end)

      # The log names the event by its place and the failure by its kind; neither the entity
      # id nor what the code raised (it may quote the event) goes to logs.
      assert log =~ "shard #{elem(Kuma.shard_for(store, "a"), 1)}, position"
      assert log =~ "(seq 2)"
      assert log =~ "RuntimeError raised"
      assert log =~ "parked"
      refute log =~ ~s("a")
      refute log =~ "poisoned event"
      # 1 try + 2 retries, then no more: no hot loop.
      attempts =
        for _ <- 1..4,
            do:
              (receive do
                 {:attempt, "a", 2} -> 1
               after
                 50 -> 0
               end)

      assert Enum.sum(attempts) == 3
      assert Enum.map(drain(:projected), & &1.data) == [:fine, :after]
      assert {:ok, %{parked: 1, status: :live}} = Projection.status(:parking)
      assert {:ok, [%{entity_id: "a", seq: 2, attempts: 3, error: error}]} = Projection.parked(:parking)
      assert error =~ "poisoned event"
    end

    test "failures in several shards are decided one event at a time, never retried forever", %{store: store} do
      {:ok, _} = Projection.start(store, Collector, name: :everywhere, args: self(), max_retries: 1, retry_backoff: 5)

      {:ok, _} =
        Projection.start(store, Collector,
          name: :everywhere_stop,
          args: self(),
          max_retries: 1,
          retry_backoff: 5,
          on_error: :stop
        )

      # Poison in every shard.
      ids = for i <- 1..24, do: "poison-#{i}"
      assert Enum.uniq(Enum.map(ids, &elem(Kuma.shard_for(store, &1), 1))) |> length() == 4

      capture_log(fn ->
        for id <- ids, do: {:ok, _} = Kuma.append(store, id, :poison)
        wait_until(fn -> match?({:ok, %{parked: 24, status: :live}}, Projection.status(:everywhere)) end)
        wait_until(fn -> match?({:ok, %{status: :stopped}}, Projection.status(:everywhere_stop)) end)
      end)

      assert {:ok, parked} = Projection.parked(:everywhere)
      assert parked |> Enum.map(& &1.entity_id) |> Enum.sort() == Enum.sort(ids)
      assert Enum.all?(parked, &(&1.attempts == 2))
    end

    test "erasing the entity a stopped projection is stuck on lets go of its event", %{store: store} do
      {:ok, _} = Projection.start(store, Collector, name: :stuck, args: self(), on_error: :stop, max_retries: 0)

      capture_log(fn ->
        {:ok, _} = Kuma.append(store, "stuck-on", [:one, :poison])
        assert {:error, :timeout} = Projection.wait_for(:stuck, heads(store), 300)
      end)

      assert {:ok, %{status: :stopped, failure: %{entity_id: "stuck-on", seq: 2}}} = Projection.status(:stuck)
      {:ok, _} = Kuma.delete(store, "stuck-on")
      assert_received {:forgot, "stuck-on"}
      assert {:ok, %{failure: %{entity_id: nil, error: :entity_erased}}} = Projection.status(:stuck)
      refute inspect(:sys.get_state(Projection.whereis(:stuck)), limit: :infinity) =~ "stuck-on"

      assert {:ok, %{entity_id: nil, seq: 2}} = Projection.skip(:stuck)
      {:ok, _} = Kuma.append(store, "next", [:after])
      assert :ok = Projection.wait_for(:stuck, heads(store), 5_000)
      assert {:ok, []} = Projection.parked(:stuck)
      assert {:ok, %{status: :live, failure: nil}} = Projection.status(:stuck)
    end

    test "stop the projection with on_error: :stop until skipped; reset replays", %{store: store} do
      {:ok, _} = Projection.start(store, Collector, name: :stopper, args: self(), on_error: :stop, max_retries: 0)

      capture_log(fn ->
        {:ok, _} = Kuma.append(store, "b", [:one, :poison, :three])
        assert {:error, :timeout} = Projection.wait_for(:stopper, heads(store), 300)
      end)

      assert {:ok, %{status: :stopped, failure: %{entity_id: "b", seq: 2}}} = Projection.status(:stopper)
      assert Enum.map(drain(:projected), & &1.data) == [:one]

      assert {:ok, %{entity_id: "b", seq: 2}} = Projection.skip(:stopper)
      assert :ok = Projection.wait_for(:stopper, heads(store), 5_000)
      assert Enum.map(drain(:projected), & &1.data) == [:three]
      assert {:ok, [%{seq: 2, error: "skipped by an operator" <> _}]} = Projection.parked(:stopper)
      assert {:error, :nothing_to_skip} = Projection.skip(:stopper)

      # Back to the start: everything is handled again (the poison stops it again).
      capture_log(fn ->
        assert :ok = Projection.reset(:stopper, %{})
        assert {:error, :timeout} = Projection.wait_for(:stopper, heads(store), 300)
      end)

      assert Enum.map(drain(:projected), & &1.data) == [:one]
      assert {:error, {:invalid, :position, _}} = Projection.reset(:stopper, :start)
    end
  end

  # Catch-up reads the next batch ahead while it handles the current one; an erasure that
  # lands in between must not let the batch read ahead put the entity's rows back.
  @tag store_opts: [shards: 1]
  test "an erasure during catch-up leaves no rows, also from batches read ahead", %{store: store} do
    victims = for r <- 1..5, do: "erase-mid-catch-up-#{r}"

    # One shard: every victim's events are spread over the whole backlog.
    for i <- 1..40 do
      for v <- victims, do: {:ok, _} = Kuma.append(store, v, {:e, i})
      {:ok, _} = Kuma.append(store, "other-#{rem(i, 7)}", for(j <- 1..5, do: {:e, j}))
    end

    for {victim, round} <- Enum.with_index(victims, 1) do
      name = :"erase_mid_catch_up_#{round}"
      {:ok, _} = ReadModel.start(store, SlowCounter, name: name, batch_size: 10)
      wait_until(fn -> match?({:ok, %{handled: h}} when h >= 30, Projection.status(name)) end)
      {:ok, %{events_deleted: 40}} = Kuma.delete(store, victim)
      :ok = Projection.wait_for(name, heads(store), 30_000)

      assert rows(name, "SELECT count(*) FROM seen WHERE entity_id = ?", [victim]) == [[0]]
      assert rows(name, "SELECT count(*) FROM counts WHERE entity_id = ?", [victim]) == [[0]]
      assert rows(name, "SELECT count(*) FROM seen") == [[40 * 5 + 40 * (5 - round)]]
      :ok = Projection.stop(name)
    end
  end
end

defmodule Kuma.Projection.RunnerDivergenceTest do
  # A shard that lost the tail of its log (an OS crash with sync: :normal) gives positions
  # out again; a projection checkpointed past them must not resume and skip the events
  # that took them.
  use Kuma.StoreCase, async: false

  import ExUnit.CaptureLog
  import Kuma.Test.ProjectionHelpers

  alias Kuma.{Projection, ReadModel}
  alias Kuma.Test.Counter

  @moduletag store: false

  defp copy_shards(from, to) do
    File.rm_rf!(to)
    File.cp_r!(Path.join(from, "shards"), to)
  end

  defp restore_shards(from, dir) do
    File.rm_rf!(Path.join(dir, "shards"))
    File.cp_r!(from, Path.join(dir, "shards"))
  end

  for {label, later} <- [{"more", 8}, {"fewer", 3}] do
    test "a shard that gave positions out again stops the projection (#{label} events since)", %{dir: dir, name: name} do
      opts = [name: name, data_dir: dir, shards: 1]
      saved = dir <> "-shards-before"
      on_exit(fn -> File.rm_rf!(saved) end)

      {:ok, store} = Kuma.start(opts)
      for i <- 1..10, do: {:ok, _} = Kuma.append(store, "a", {:e, i})
      :ok = Kuma.stop(store)
      copy_shards(dir, saved)

      # Five more events, counted by the read model; then the shard loses them.
      {:ok, store} = Kuma.start(opts)
      {:ok, _} = ReadModel.start(store, Counter, name: :diverging)
      for i <- 11..15, do: {:ok, _} = Kuma.append(store, "a", {:e, i})
      :ok = Projection.wait_for(:diverging, heads(store))
      :ok = Kuma.stop(store)
      wait_until(fn -> Projection.whereis(:diverging) == nil end)
      restore_shards(saved, dir)

      # New events take positions 11.. again.
      {:ok, store} = Kuma.start(opts)
      for i <- 1..unquote(later), do: {:ok, _} = Kuma.append(store, "b", {:new, i})

      log =
        capture_log(fn ->
          {:ok, _} = ReadModel.start(store, Counter, name: :diverging)
        end)

      assert {:ok, %{status: :stopped, failure: %{error: {:shard_diverged, 0, 15, last}}}} =
               Projection.status(:diverging)

      assert last == 10 + unquote(later)
      assert log =~ "no longer holds the events"
      # Nothing of the new events was skipped: a rebuild counts exactly what the shard holds.
      assert :ok = Projection.rebuild(:diverging)
      :ok = Projection.wait_for(:diverging, heads(store))
      assert rows(:diverging, "SELECT entity_id, n FROM counts ORDER BY 1") == [["a", 10], ["b", unquote(later)]]
      :ok = Kuma.stop(store)
    end
  end

  test "an erasure at the checkpoint's position is not a divergence", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 1)
    {:ok, _} = ReadModel.start(store, Counter, name: :erased_at_mark)
    {:ok, _} = Kuma.append(store, "keep", {:e, 1})
    {:ok, _} = Kuma.append(store, "gone", {:e, 2})
    :ok = Projection.wait_for(:erased_at_mark, heads(store))
    :ok = Projection.stop(:erased_at_mark)
    {:ok, _} = Kuma.delete(store, "gone")
    {:ok, _} = ReadModel.start(store, Counter, name: :erased_at_mark)
    {:ok, _} = Kuma.append(store, "keep", {:e, 3})
    :ok = Projection.wait_for(:erased_at_mark, heads(store))
    assert {:ok, %{status: :live}} = Projection.status(:erased_at_mark)
    :ok = Kuma.stop(store)
  end
end
