defmodule Kuma.ProjectionTest do
  use Kuma.StoreCase, async: false

  import Kuma.Test.ProjectionHelpers

  alias Kuma.{Projection, ReadModel}
  alias Kuma.Test.{Collector, Counter}

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
    assert {:error, {:invalid, :timeout, _}} = Projection.wait_for(:ryw, %{}, -5)
    assert {:error, {:invalid, :return, _}} = Kuma.append(store, "ryw", :e, return: :pos)
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
      # Read-only for good, and no query runs past its timeout, however many run at once.
      {:ok, _} = ReadModel.query(:q, "PRAGMA query_only = 0")
      assert {:error, {:sql, nil, _}} = ReadModel.query(:q, "DELETE FROM counts")
      endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
      runaway = for _ <- 1..12, do: Task.async(fn -> ReadModel.query(:q, endless, [], timeout: 200) end)
      # Meanwhile the store reads and writes (reads use dirty IO schedulers too).
      assert {:ok, 1} = Kuma.append(store, "during-runaway-queries", :e)
      assert {:ok, [_]} = Kuma.events(store, "during-runaway-queries")
      assert Enum.all?(Task.await_many(runaway, 10_000), &(&1 == {:error, :timeout}))
      assert {:error, {:invalid, :timeout, _}} = ReadModel.query(:q, "SELECT 1", [], timeout: 0)
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
end
