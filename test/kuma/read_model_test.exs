defmodule Kuma.ReadModelTest do
  use Kuma.StoreCase, async: false

  import ExUnit.CaptureLog
  import Kuma.Test.ProjectionHelpers

  alias Kuma.{Projection, ReadModel}
  alias Kuma.Test.{Collector, Counter}

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

  describe "failures" do
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

      assert log =~ "SQL statement 0 failed"
      refute log =~ "nowhere"
      assert rows(:bad_sql, "SELECT seq FROM t ORDER BY seq") == [[1], [2]]
      assert {:ok, %{status: :stopped, failure: %{seq: 3, error: {:sql, 0, msg}}}} = Projection.status(:bad_sql)
      assert msg =~ "nowhere"
    end
  end
end
