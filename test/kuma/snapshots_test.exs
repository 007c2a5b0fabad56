defmodule Kuma.SnapshotsTest do
  # Snapshots a framework saves for its own aggregates (Kuma.Snapshots): saved as of an
  # entity's seq, read back latest or at most a version, deleted, refused for versions the
  # entity does not have, sealed and erased with the entity, and kept apart from the
  # snapshots Kuma's own entity processes take.
  use Kuma.StoreCase, async: true

  @moduletag store_opts: [aggregates: [Bank.Account], snapshot_every: 5]

  defp events(n), do: for(i <- 1..n, do: {:happened, i})

  test "save, read the latest or at most a version, delete", %{store: store} do
    {:ok, 10} = Kuma.append(store, "s1", events(10))
    assert {:ok, nil} = Kuma.read_snapshot(store, "s1")

    :ok = Kuma.save_snapshot(store, "s1", 5, %{count: 5})
    :ok = Kuma.save_snapshot(store, "s1", 10, %{count: 10})

    assert {:ok, %{version: 10, data: %{count: 10}, timestamp: ts}} = Kuma.read_snapshot(store, "s1")
    assert is_integer(ts)
    assert {:ok, %{version: 5, data: %{count: 5}}} = Kuma.read_snapshot(store, "s1", at_most: 9)
    assert {:ok, nil} = Kuma.read_snapshot(store, "s1", at_most: 4)

    # Saved again at the same version: the newer data replaces it.
    :ok = Kuma.save_snapshot(store, "s1", 10, %{count: :ten})
    assert {:ok, %{version: 10, data: %{count: :ten}}} = Kuma.read_snapshot(store, "s1")

    assert :ok = Kuma.delete_snapshots(store, "s1")
    assert {:ok, nil} = Kuma.read_snapshot(store, "s1")
    assert :ok = Kuma.delete_snapshots(store, "never-written")
  end

  test "bad versions and ids are refused and store nothing", %{store: store} do
    {:ok, 3} = Kuma.append(store, "s2", events(3))

    for bad <- [0, -1, 1.5, "2", nil] do
      assert {:error, {:invalid, :version, _}} = Kuma.save_snapshot(store, "s2", bad, :x)
    end

    assert {:error, {:invalid, :version, why}} = Kuma.save_snapshot(store, "s2", 4, :x)
    assert why =~ "past the entity's last seq (3)"
    assert {:error, {:invalid, :version, _}} = Kuma.save_snapshot(store, "nobody", 1, :x)
    assert {:error, {:invalid, :entity_id, _}} = Kuma.save_snapshot(store, "", 1, :x)
    assert {:error, {:invalid, :at_most, _}} = Kuma.read_snapshot(store, "s2", at_most: 0)
    assert {:ok, nil} = Kuma.read_snapshot(store, "s2")
  end

  @tag :sqlite3_cli
  test "sealed at rest, exported with the entity, erased with it", %{store: store, dir: dir} do
    marker = "snapshot-marker-#{System.unique_integer([:positive])}"
    {:ok, 2} = Kuma.append(store, "s3", events(2))
    :ok = Kuma.save_snapshot(store, "s3", 2, %{secret: marker})
    :ok = Kuma.flush(store)
    assert files_holding(dir, [marker]) == []
    assert {:ok, [2]} = snapshot_seqs(store, "s3", 0)

    {:ok, export} = Kuma.export(store, "s3")
    assert [%{seq: 2, version: 0, state: %{secret: ^marker}}] = export.snapshots

    {:ok, _} = Kuma.delete(store, "s3")
    assert {:error, :entity_erased} = Kuma.save_snapshot(store, "s3", 2, :again)
    assert {:error, :entity_erased} = Kuma.read_snapshot(store, "s3")
    assert eventually(fn -> match?({:ok, %{complete: true}}, Kuma.erasure_status(store, "s3")) end)
    # The snapshot's row went with the entity: the only snapshot of this store is gone
    # (counted in the files once the store is stopped: a second process on a live shard
    # file could disturb it).
    :ok = Kuma.stop(store)
    assert snapshot_rows(dir) == 0
  end

  test "kept apart from the snapshots of Kuma's own entity processes", %{store: store} do
    account = Kuma.entity(store, Bank.Account, "acct")
    for _ <- 1..12, do: {:ok, _} = Kuma.execute(account, {:deposit, 1})
    # The entity process snapshotted itself at 5 and 10 (snapshot_every: 5); a framework
    # snapshot at 7 is the only one read_snapshot sees.
    assert eventually(fn -> match?({:ok, [_, _]}, snapshot_seqs(store, "acct", 1)) end)
    assert {:ok, nil} = Kuma.read_snapshot(store, "acct")
    :ok = Kuma.save_snapshot(store, "acct", 7, :framework_state)
    assert {:ok, %{version: 7, data: :framework_state}} = Kuma.read_snapshot(store, "acct")

    # The entity still loads from its own latest snapshot.
    :ok = Kuma.Entity.passivate(account)
    assert Kuma.read(account).balance == 12
    assert {:ok, %{live: true, snapshot_seq: 10}} = Kuma.Entity.info(account)

    # Deleting the framework's snapshots leaves the entity's own.
    :ok = Kuma.delete_snapshots(store, "acct")
    assert {:ok, [5, 10]} = snapshot_seqs(store, "acct", 1)
  end

  defmodule VersionZero do
    @moduledoc false
    def init(_id), do: nil
    def apply(state, _event), do: state
    def snapshot_version, do: 0
  end

  @tag store: false
  test "an aggregate cannot take the snapshot version frameworks' snapshots use", %{dir: dir, name: name} do
    assert {:error, {:invalid, :aggregates, why}} = Kuma.start(name: name, data_dir: dir, aggregates: [VersionZero])
    assert why =~ "0 is kept for framework snapshots"
  end

  # Snapshot rows in every shard file, counted by the sqlite3 command-line tool.
  defp snapshot_rows(dir) do
    for file <- Path.wildcard(Path.join(dir, "shards/*.kuma")), reduce: 0 do
      n ->
        {out, 0} = System.cmd("sqlite3", [file, "SELECT count(*) FROM snapshots"])
        n + String.to_integer(String.trim(out))
    end
  end

  defp snapshot_seqs(store, id, version) do
    {:ok, s} = Kuma.Store.lookup(store)

    with {:ok, snaps} <- Kuma.Native.read_snapshots(s.native, id) do
      {:ok, for(%{seq: seq, version: ^version} <- snaps, do: seq)}
    end
  end
end
