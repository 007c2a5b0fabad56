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

  defmodule Ledger do
    # Rows about Bob that name Alice: her name travels as a Kuma.Sensitive and is stored as
    # one; each customer's own name is sealed under their own key.
    use Kuma.ReadModel

    def schema do
      [
        "CREATE TABLE transfers (entity_id TEXT NOT NULL, recipient BLOB, amount INTEGER)",
        "CREATE TABLE customers (entity_id TEXT PRIMARY KEY, name BLOB)",
        "CREATE TABLE mentions (entity_id TEXT NOT NULL, who BLOB)"
      ]
    end

    def handle_event(%Kuma.Envelope{entity_id: id, data: {:registered, name}}),
      do: {"INSERT INTO customers VALUES (?1, ?2)", [id, Kuma.sensitive(id, name)]}

    def handle_event(%Kuma.Envelope{entity_id: id, data: {:transfer_sent, %{to: to, amount: amount}}}),
      do: {"INSERT INTO transfers VALUES (?1, ?2, ?3)", [id, to, amount]}

    # A value made here, about a subject that may be erased already.
    def handle_event(%Kuma.Envelope{entity_id: id, data: {:mentioned, subject, text}}),
      do: {"INSERT INTO mentions VALUES (?1, ?2)", [id, Kuma.sensitive(subject, text, placeholder: :gone)]}
  end

  describe "sensitive values" do
    test "are stored sealed, read back until their subject is erased, then answer the placeholder",
         %{store: store, dir: dir} do
      name = "Alice Liddell #{System.unique_integer([:positive])}"
      {:ok, _} = ReadModel.start(store, Ledger, name: :ledger)
      {:ok, _} = Kuma.append(store, "alice", {:registered, name})
      {:ok, _} = Kuma.append(store, "bob", {:registered, "Bob"})
      to = Kuma.sensitive("alice", name, placeholder: "A.")
      {:ok, _} = Kuma.append(store, "bob", {:transfer_sent, %{to: to, amount: 5}})
      :ok = Projection.wait_for(:ledger, heads(store))

      assert rows(:ledger, "SELECT entity_id, recipient, amount FROM transfers") == [["bob", name, 5]]

      assert rows(:ledger, "SELECT entity_id, name FROM customers ORDER BY entity_id") == [
               ["alice", name],
               ["bob", "Bob"]
             ]

      # Her name is in no file of the read model, so no copy of them can give it back.
      projections = Path.join(dir, "projections")
      files = files_under(projections)
      assert files != []
      for file <- files, do: refute(File.read!(file) =~ name, "#{file} holds the clear value")
      backup = Path.join(dir, "backup")
      File.mkdir_p!(backup)
      for file <- files, do: File.cp!(file, Path.join(backup, Path.basename(file)))

      assert {:ok, _} = Kuma.delete(store, "alice")
      assert rows(:ledger, "SELECT entity_id, recipient, amount FROM transfers") == [["bob", "A.", 5]]
      assert rows(:ledger, "SELECT entity_id, name FROM customers") == [["bob", "Bob"]]

      # Mentioned after her erasure: only the placeholder is stored, and the event is not failed.
      {:ok, _} = Kuma.append(store, "carol", {:mentioned, "alice", name})
      :ok = Projection.wait_for(:ledger, heads(store))
      assert rows(:ledger, "SELECT who FROM mentions") == [[:gone]]
      assert {:ok, %{status: :live, failure: nil, parked: 0}} = Projection.status(:ledger)

      # The cells of the copy taken before the erasure can no longer be opened: the key that
      # sealed them is destroyed. Open the copy as the read model's file and ask it.
      :ok = Projection.stop(:ledger)
      File.rm_rf!(projections)
      File.rename!(backup, projections)
      {:ok, _} = ReadModel.start(store, Ledger, name: :ledger)
      assert ["bob", "A.", 5] in rows(:ledger, "SELECT entity_id, recipient, amount FROM transfers")
      assert ["alice", :erased] in rows(:ledger, "SELECT entity_id, name FROM customers")
      for file <- files_under(projections), do: refute(File.read!(file) =~ name)
    end

    test "a cell that only looks sealed comes back as stored", %{store: store} do
      {:ok, _} = ReadModel.start(store, Ledger, name: :ledger_raw)
      {:ok, _} = Kuma.append(store, "bob", {:registered, "Bob"})
      :ok = Projection.wait_for(:ledger_raw, heads(store))
      forged = "KUMASENS" <> <<1, 0, 1, 2>>
      assert [[^forged]] = rows(:ledger_raw, "SELECT ?1", [{:blob, forged}])
    end
  end

  test "the store's :projections_dir holds read models' files, outside the data dir", %{dir: dir} do
    elsewhere = dir <> "-projections"
    on_exit(fn -> File.rm_rf!(elsewhere) end)
    name = :"kuma_pdir_#{System.unique_integer([:positive])}"
    {:ok, store} = Kuma.start(name: name, data_dir: dir <> "-store", shards: 1, projections_dir: elsewhere)
    on_exit(fn -> File.rm_rf!(dir <> "-store") end)
    {:ok, _} = ReadModel.start(store, Counter, name: :elsewhere)
    {:ok, _} = Kuma.append(store, "x", {:e, 1})
    :ok = Projection.wait_for(:elsewhere, heads(store))
    assert File.exists?(Path.join(elsewhere, "elsewhere.sqlite"))
    refute File.exists?(Path.join([dir <> "-store", "projections"]))
    assert File.stat!(elsewhere).mode |> Bitwise.band(0o777) == 0o700
    :ok = Kuma.stop(store)
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
