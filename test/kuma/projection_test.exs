defmodule Kuma.ProjectionTest do
  use Kuma.StoreCase, async: false

  import ExUnit.CaptureLog

  alias Kuma.{Position, Projection, ReadModel}
  alias Kuma.Test.{Collector, Counter, SlowCounter}

  # Everything committed so far, as a token.
  defp heads(store) do
    {:ok, position} = Kuma.position(store)
    position
  end

  defp rows(name, sql, params \\ []) do
    {:ok, %{rows: rows}} = ReadModel.query(name, sql, params)
    rows
  end

  defp drain(tag, acc \\ []) do
    receive do
      {^tag, value} -> drain(tag, [value | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

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

      assert log =~ "event 2 of entity \"a\""
      assert log =~ "poisoned event"
      assert log =~ "parked"
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

    test "bad SQL from handle_event fails that event and keeps earlier rows", %{store: store} do
      defmodule BadSql do
        use Kuma.ReadModel
        def schema, do: ["CREATE TABLE t (entity_id TEXT, seq INTEGER)"]
        def handle_event(%{data: :bad}), do: [{"INSERT INTO nowhere VALUES (1)", []}]
        def handle_event(e), do: [{"INSERT INTO t VALUES (?1, ?2)", [e.entity_id, e.seq]}]
      end

      {:ok, _} = ReadModel.start(store, BadSql, name: :bad_sql, on_error: :stop, max_retries: 0, batch_size: 10)

      log =
        capture_log(fn ->
          {:ok, _} = Kuma.append(store, "c", [:ok, :ok, :bad, :ok])
          assert {:error, :timeout} = Projection.wait_for(:bad_sql, heads(store), 300)
        end)

      assert log =~ "no such table: nowhere"
      assert rows(:bad_sql, "SELECT seq FROM t ORDER BY seq") == [[1], [2]]
      assert {:ok, %{status: :stopped, failure: %{seq: 3, error: {:sql, 0, msg}}}} = Projection.status(:bad_sql)
      assert msg =~ "nowhere"
    end
  end

  test "rebuild replays into an identical read model while writes go on", %{store: store} do
    {:ok, _} = ReadModel.start(store, Counter, name: :rebuilt)
    for i <- 1..300, do: {:ok, _} = Kuma.append(store, "r#{rem(i, 17)}", {:e, i})
    :ok = Projection.wait_for(:rebuilt, heads(store), 10_000)
    before = rows(:rebuilt, "SELECT entity_id, n FROM counts ORDER BY entity_id")

    writer = Task.async(fn -> for i <- 1..50, do: {:ok, _} = Kuma.append(store, "late-#{i}", {:e, i}) end)
    assert :ok = Projection.rebuild(:rebuilt)
    Task.await(writer)
    :ok = Projection.wait_for(:rebuilt, heads(store), 10_000)

    after_rebuild = rows(:rebuilt, "SELECT entity_id, n FROM counts ORDER BY entity_id")
    assert Enum.reject(after_rebuild, fn [id, _] -> String.starts_with?(id, "late-") end) == before
    assert length(after_rebuild) == length(before) + 50
    assert [[350]] = rows(:rebuilt, "SELECT count(*) FROM seen")
  end

  test "filters by type, id prefix and scope", %{store: store} do
    {:ok, _} =
      Projection.start(store, Collector, name: :typed, args: self(), types: [:opened, "closed"], checkpoint: :memory)

    {:ok, _} = ReadModel.start(store, Counter, name: :users_only, id_prefix: "user-")
    {:ok, _} = ReadModel.start(store, Counter, name: :acme, scope: "org:acme/*")

    {:ok, _} = Kuma.append(store, "user-1", [{:opened, 1}, {:renamed, 2}], metadata: %{scope: "org:acme/t1"})
    {:ok, _} = Kuma.append(store, "order-1", [{:closed, 1}], metadata: %{scope: "org:acmex"})
    {:ok, _} = Kuma.append(store, "user-2", [{:renamed, 1}])
    token = heads(store)

    for name <- [:typed, :users_only, :acme], do: :ok = Projection.wait_for(name, token, 5_000)

    assert drain(:projected) |> Enum.map(&{&1.entity_id, &1.type}) |> Enum.sort() ==
             [{"order-1", "closed"}, {"user-1", "opened"}]

    assert rows(:users_only, "SELECT entity_id, n FROM counts ORDER BY 1") == [["user-1", 2], ["user-2", 1]]
    assert rows(:acme, "SELECT entity_id, n FROM counts") == [["user-1", 2]]
    assert {:error, {:invalid, :scope, _}} = Kuma.append(store, "x", :e, metadata: %{scope: 7})
  end

  test "wait_for gives read-your-writes, and times out cleanly", %{store: store} do
    {:ok, _} = ReadModel.start(store, Counter, name: :ryw)

    for i <- 1..20 do
      {:ok, seq, token} = Kuma.append(store, "ryw", {:e, i}, return: :token)
      :ok = Projection.wait_for(:ryw, token)
      assert rows(:ryw, "SELECT n FROM counts WHERE entity_id = 'ryw'") == [[seq]]
    end

    assert {:error, :timeout} = Projection.wait_for(:ryw, %{0 => 1_000_000_000}, 50)
    assert {:error, {:unknown_projection, :nope}} = Projection.wait_for(:nope, %{}, 50)
    assert {:error, {:invalid, :token, _}} = Projection.wait_for(:ryw, [1], 50)
    assert {:error, {:invalid, :return, _}} = Kuma.append(store, "ryw", :e, return: :pos)
  end

  test "a slow subscriber's mailbox stays bounded and it still gets every event", %{store: store} do
    {:ok, sub} = Kuma.subscribe(store, max_queue: 100)
    batches = for b <- 1..40, do: {"s#{rem(b, 8)}", for(i <- 1..50, do: {:e, b, i})}
    {:ok, _} = Kuma.append_batch(store, batches)
    Process.sleep(300)

    {:message_queue_len, queued} = Process.info(self(), :message_queue_len)
    assert queued <= 101, "mailbox holds #{queued} messages"
    assert_received {:kuma_lagged, position} when is_map(position)

    events = receive_events(2_000, [])
    assert length(events) == 2_000
    assert events |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.uniq() |> length() == 2_000

    for {_id, per_entity} <- Enum.group_by(events, & &1.entity_id) do
      assert Enum.map(per_entity, & &1.seq) == Enum.to_list(1..length(per_entity))
    end

    Kuma.unsubscribe(sub)
    refute Process.alive?(sub)
  end

  defp receive_events(0, acc), do: Enum.reverse(acc)

  defp receive_events(n, acc) do
    receive do
      {:kuma_event, e} -> receive_events(n - 1, [e | acc])
      {:kuma_lagged, _} -> receive_events(n, acc)
    after
      5_000 -> Enum.reverse(acc)
    end
  end

  test "subscriptions filter, start from now or from the start, and end with the caller", %{store: store} do
    {:ok, _} = Kuma.append(store, "early", {:created, 1})
    {:ok, _} = Kuma.subscribe(store, type: :created)
    {:ok, _} = Kuma.subscribe(store, entity_id: "early", from: :start)
    {:ok, _} = Kuma.append(store, "early", {:updated, 2})
    {:ok, _} = Kuma.append(store, "early-bird", {:created, 3})

    got = receive_events(4, []) |> Enum.map(&{&1.entity_id, &1.type}) |> Enum.sort()
    # :created after subscribing (not early's first); everything of "early" (not early-bird).
    assert got == [{"early", "created"}, {"early", "updated"}, {"early-bird", "created"}]
    refute_receive {:kuma_event, _}, 100

    parent = self()
    child = spawn(fn -> send(parent, Kuma.subscribe(store)) end)
    assert_receive {:ok, sub}
    ref = Process.monitor(sub)
    refute Process.alive?(child)
    assert_receive {:DOWN, ^ref, :process, ^sub, _}, 1_000
    assert {:error, {:invalid, :from, _}} = Kuma.subscribe(store, from: :yesterday)
    assert {:error, {:unknown_option, :typo}} = Kuma.subscribe(store, typo: 1)
  end

  test "erasure: forget removes the entity's rows, down to the bytes of the file", %{store: store, dir: dir} do
    {:ok, _} = ReadModel.start(store, Counter, name: :forgetful)
    {:ok, _} = Projection.start(store, Collector, name: :forgetful_p, args: self())
    marker = "erase-me-#{System.unique_integer([:positive])}"
    {:ok, _} = Kuma.append(store, marker, [{:e, 1}, {:e, 2}])
    {:ok, _} = Kuma.append(store, "keeper", {:e, 1})
    :ok = Projection.wait_for(:forgetful, heads(store))
    assert [[2]] = rows(:forgetful, "SELECT n FROM counts WHERE entity_id = ?", [marker])

    assert {:ok, %{events_deleted: 2}} = Kuma.delete(store, marker)
    assert_received {:forgot, ^marker}
    assert rows(:forgetful, "SELECT count(*) FROM counts WHERE entity_id = ?", [marker]) == [[0]]
    assert rows(:forgetful, "SELECT count(*) FROM seen WHERE entity_id = ?", [marker]) == [[0]]
    assert rows(:forgetful, "SELECT entity_id FROM counts") == [["keeper"]]

    for file <- files_under(Path.join(dir, "projections")) do
      refute :binary.match(File.read!(file), marker) != :nomatch, "#{file} still holds the erased id"
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

  test "query by type and scope across shards, in order, with paging", %{store: store} do
    for i <- 1..200 do
      scope = Enum.at(["org:acme/a", "org:acme/b", "org:other", nil], rem(i, 4))
      type = if rem(i, 5) == 0, do: :paid, else: :viewed
      metadata = if scope, do: %{scope: scope}, else: %{}
      {:ok, _} = Kuma.append(store, "q#{rem(i, 13)}", {type, i}, metadata: metadata)
    end

    all = for n <- 0..12, {:ok, events} = Kuma.events(store, "q#{n}"), e <- events, do: e

    expect = fn pred -> all |> Enum.filter(pred) |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() end

    {:ok, paid} = Kuma.query(store, type: :paid, limit: 1000)
    assert paid |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() == expect.(&(&1.type == "paid"))

    {:ok, acme} = Kuma.query(store, scope: "org:acme/*", limit: 1000)

    assert acme |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() ==
             expect.(&(Map.get(&1.metadata, :scope, "") |> String.starts_with?("org:acme/")))

    {:ok, other} = Kuma.query(store, scope: "org:other", type: "viewed", limit: 1000)
    assert Enum.all?(other, &(&1.metadata.scope == "org:other" and &1.type == "viewed"))
    assert length(other) == length(expect.(&(Map.get(&1.metadata, :scope) == "org:other" and &1.type == "viewed")))

    # In position order within each shard; merged by time.
    for {_s, envs} <- Enum.group_by(acme, & &1.shard),
        do: assert(Enum.map(envs, & &1.position) == Enum.sort(Enum.map(envs, & &1.position)))

    assert Enum.map(acme, & &1.timestamp) == Enum.sort(Enum.map(acme, & &1.timestamp))

    # Paging visits each event exactly once.
    pages =
      Stream.unfold(%{}, fn after_pos ->
        case Kuma.query(store, scope: "org:acme/*", after: after_pos, limit: 7) do
          {:ok, []} -> nil
          {:ok, page} -> {page, Position.merge(after_pos, Position.of(page))}
        end
      end)
      |> Enum.concat()

    assert Enum.map(pages, &{&1.entity_id, &1.seq}) |> Enum.sort() ==
             Enum.map(acme, &{&1.entity_id, &1.seq}) |> Enum.sort()

    last = List.last(all, nil) && Enum.max_by(all, & &1.timestamp)
    {:ok, recent} = Kuma.query(store, from: last.timestamp, limit: 1000)
    assert Enum.all?(recent, &(&1.timestamp >= last.timestamp)) and recent != []

    assert {:error, {:invalid, :limit, _}} = Kuma.query(store, limit: 0)
    assert {:error, {:invalid, :scope, _}} = Kuma.query(store, scope: 5)
    assert {:error, {:invalid, :from, _}} = Kuma.query(store, from: "yesterday")
    assert {:error, {:unknown_option, :entity}} = Kuma.query(store, entity: "x")
  end

  describe "bad input" do
    test "unknown projections, invalid modules and schemas, bad queries", %{store: store} do
      assert {:error, {:unknown_projection, :ghost}} = Projection.status(:ghost)
      assert {:error, {:unknown_projection, :ghost}} = ReadModel.query(:ghost, "SELECT 1")
      assert {:error, {:invalid, :module, _}} = Projection.start(store, NotAModule)
      assert {:error, {:invalid, :module, _}} = Projection.start(store, Enum)
      assert {:error, {:invalid, :on_error, _}} = ReadModel.start(store, Counter, on_error: :explode)
      assert {:error, {:invalid, :types, _}} = ReadModel.start(store, Counter, types: [""])

      defmodule BadSchema do
        use Kuma.ReadModel
        def schema, do: ["CREATE TABEL oops (x)"]
        def handle_event(_), do: []
      end

      assert {:error, {:invalid_schema, BadSchema, {:sql, 0, _}}} = ReadModel.start(store, BadSchema, name: :bad_schema)
      assert Projection.whereis(:bad_schema) == nil

      {:ok, _} = ReadModel.start(store, Counter, name: :q)
      assert {:error, {:already_started, :q}} = ReadModel.start(store, Counter, name: :q)
      assert {:error, {:sql, nil, msg}} = ReadModel.query(:q, "SELEKT * FROM counts")
      assert msg =~ "syntax error"
      assert {:error, {:sql, nil, _}} = ReadModel.query(:q, "DELETE FROM counts")
      assert {:error, {:sql, nil, _}} = ReadModel.query(:q, "SELECT ?1", [])
      assert {:error, {:invalid, :sql_params, _}} = ReadModel.query(:q, "SELECT ?1", [%{}])

      assert {:ok, %{rows: [[1, 2.5, "x", nil, <<255>>]]}} =
               ReadModel.query(:q, "SELECT ?, ?, ?, ?, ?", [1, 2.5, "x", nil, <<255>>])
    end

    test "stop, then start again, resumes from the checkpoint", %{store: store} do
      {:ok, _} = ReadModel.start(store, Counter, name: :paused)
      {:ok, _} = Kuma.append(store, "p", [{:e, 1}, {:e, 2}])
      :ok = Projection.wait_for(:paused, heads(store))
      assert :ok = Projection.stop(:paused)
      wait_until(fn -> Projection.whereis(:paused) == nil end)
      {:ok, _} = Kuma.append(store, "p", {:e, 3})
      Process.sleep(50)
      assert Projection.whereis(:paused) == nil, "a stopped projection is not restarted"
      {:ok, _} = ReadModel.start(store, Counter, name: :paused)
      :ok = Projection.wait_for(:paused, heads(store))
      assert {:ok, %{handled: 1}} = Projection.status(:paused)
      assert rows(:paused, "SELECT n FROM counts") == [[3]]
    end

    test "a killed projection restarts from its checkpoint", %{store: store} do
      {:ok, pid} = ReadModel.start(store, Counter, name: :killed)
      {:ok, _} = Kuma.append(store, "k", [{:e, 1}, {:e, 2}])
      :ok = Projection.wait_for(:killed, heads(store))
      Process.exit(pid, :kill)
      {:ok, _} = Kuma.append(store, "k", {:e, 3})
      wait_until(fn -> Projection.whereis(:killed) not in [nil, pid] end)
      :ok = Projection.wait_for(:killed, heads(store))
      assert rows(:killed, "SELECT n FROM counts") == [[3]]
    end
  end

  test "projections configured with the store start with it and resume where they were", %{dir: dir} do
    name = :"configured_#{System.unique_integer([:positive])}"
    opts = [name: name, data_dir: Path.join(dir, "c"), shards: 2, projections: [{Counter, name: :configured}]]
    {:ok, store} = Kuma.start(opts)
    for i <- 1..30, do: {:ok, _} = Kuma.append(store, "c#{rem(i, 3)}", {:e, i})
    :ok = Projection.wait_for(:configured, heads(store))
    :ok = Kuma.stop(store)
    # The registry drops a stopped process's name asynchronously.
    wait_until(fn -> Projection.whereis(:configured) == nil end)

    {:ok, store} = Kuma.start(opts)
    {:ok, _} = Kuma.append(store, "c0", {:e, 31})
    :ok = Projection.wait_for(:configured, heads(store))
    assert {:ok, %{handled: 1}} = Projection.status(:configured)
    assert rows(:configured, "SELECT sum(n) FROM counts") == [[31]]

    # Stopped means stopped: not restarted by its supervisor.
    assert :ok = Projection.stop(:configured)
    wait_until(fn -> Projection.whereis(:configured) == nil end)
    Process.sleep(100)
    assert Projection.whereis(:configured) == nil
    assert {:error, {:unknown_projection, :configured}} = Projection.stop(:configured)
    :ok = Kuma.stop(store)

    assert {:error, {:invalid, :module, _}} = Kuma.start(Keyword.put(opts, :projections, [Nope]))
    assert {:error, {:invalid, :projections, _}} = Kuma.start(Keyword.put(opts, :projections, [Counter, Counter]))
  end

  defp wait_until(fun, tries \\ 1_000) do
    cond do
      fun.() -> :ok
      tries == 0 -> flunk("condition never became true")
      true -> Process.sleep(5) && wait_until(fun, tries - 1)
    end
  end
end
