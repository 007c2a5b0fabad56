defmodule Kuma.BackupTest do
  # Online backup and restore (Kuma.Backup): a consistent copy taken while writers go on,
  # restored whole and verified; every kind of damage refused by name with nothing written;
  # and what a backup can still read after an erasure, with and without the keystore.
  use Kuma.StoreCase, async: true

  @moduletag store_opts: [shards: 3]

  defp all_events(store, ids), do: Map.new(ids, fn id -> {id, elem(Kuma.events(store, id), 1)} end)

  defp leftovers(dir), do: Path.wildcard(Path.join(Path.dirname(dir), ".#{Path.basename(dir)}.*"), match_dot: true)

  test "a backup taken while writers go on restores to a consistent, verified store", %{
    store: store,
    dir: dir,
    name: name
  } do
    ids = for i <- 1..60, do: "acct-#{i}"
    for id <- ids, do: {:ok, 3} = Kuma.append(store, id, [{:opened, id}, {:deposit, 1}, {:deposit, 2}])

    # Four writers append one event at a time, each to its own entities, during the backup.
    writers =
      for w <- 1..4 do
        Task.async(fn ->
          Enum.reduce_while(Stream.iterate(1, &(&1 + 1)), 0, fn i, _ ->
            {:ok, _} = Kuma.append(store, "busy-#{w}-#{rem(i, 7)}", [{:tick, i}])
            if i >= 400, do: {:halt, i}, else: {:cont, i}
          end)
        end)
      end

    backup = dir <> "-backup"
    me = self()
    assert {:ok, report} = Kuma.backup(store, backup, on_progress: &send(me, {:progress, &1}))
    Enum.each(writers, &Task.await(&1, 30_000))

    assert report.keystore == false
    assert length(report.shards) == 3
    assert_received {:progress, %{phase: :copy, done: 1, total: total}}
    assert_received {:progress, %{phase: :copy, done: ^total, segment: _, bytes: _}}
    assert File.exists?(Path.join(backup, "BACKUP"))
    assert leftovers(backup) == []

    # Keep the keystore of the original for the restore (the backup holds none).
    before = all_events(store, ids)

    busy_before =
      for w <- 1..4, r <- 0..6, into: %{}, do: {"busy-#{w}-#{r}", elem(Kuma.events(store, "busy-#{w}-#{r}"), 1)}

    :ok = Kuma.stop(store)

    target = dir <> "-restored"
    assert {:ok, restored} = Kuma.restore(backup, target, keystore_path: Path.join(dir, "keystore.kuma"))
    assert restored.keystore == :external
    assert restored.shards == report.shards

    {:ok, r} =
      Kuma.start(name: :"#{name}_r", data_dir: target, shards: 3, keystore_path: Path.join(dir, "keystore.kuma"))

    try do
      # What was there before the backup began is there whole.
      assert all_events(r, ids) == before

      # Each busy entity holds a prefix of what the original holds: the copy of its shard
      # is one moment, never an event without the ones before it.
      for {id, events} <- busy_before do
        {:ok, got} = Kuma.events(r, id)
        assert got == Enum.take(events, length(got))
      end

      # The positions the manifest records are what the restored shards hold.
      {:ok, positions} = Kuma.position(r)
      assert Enum.map(report.shards, & &1.position) == Enum.map(0..2, &Map.get(positions, &1, 0))

      assert {:ok, %{events: events}} = Kuma.verify_store(r)
      assert events == Enum.sum(Enum.map(report.shards, & &1.events))

      # The store-wide order numbers every restored event once, without a hole.
      :ok = eventually(fn -> Kuma.global_position(r) == {:ok, events} end) && :ok
      assert r |> Kuma.stream_all() |> Enum.map(& &1.global) == Enum.to_list(1..events)

      # And the restored store takes new writes.
      assert {:ok, 4} = Kuma.append(r, "acct-1", [{:deposit, 3}])
    after
      Kuma.stop(r)
      File.rm_rf!(target)
      File.rm_rf!(backup)
    end
  end

  describe "a damaged backup is refused, with the first bad frame named, and nothing written" do
    setup %{store: store, dir: dir} do
      for i <- 1..300, do: {:ok, _} = Kuma.append(store, "e#{i}", [:binary.copy(<<i>>, 3000)])
      backup = dir <> "-backup"
      {:ok, _} = Kuma.backup(store, backup, keystore: true)
      target = dir <> "-restored"
      on_exit(fn -> File.rm_rf!(backup) && File.rm_rf!(target) end)
      %{backup: backup, target: target}
    end

    defp refused(backup, target, reason_match) do
      result = Kuma.restore(backup, target)
      assert reason_match.(result), "unexpected: #{inspect(result)}"
      refute File.exists?(target)
      assert leftovers(target) == []
      result
    end

    test "a bit flipped in a shard's segment", %{backup: backup, target: target} do
      seg = Path.join(backup, "shard-001.seg")
      bytes = File.read!(seg)
      # Past the header frame, in the first data frame's payload.
      at = div(byte_size(bytes), 2)
      <<pre::binary-size(at), b, post::binary>> = bytes
      File.write!(seg, <<pre::binary, Bitwise.bxor(b, 0x10), post::binary>>)

      {:error, {:backup_damaged, "shard-001.seg", frame, "CRC32 mismatch"} = reason} =
        refused(backup, target, &match?({:error, {:backup_damaged, "shard-001.seg", _, _}}, &1))

      assert frame >= 1
      assert Kuma.format_error(reason) =~ "shard-001.seg, frame #{frame}"
    end

    test "a truncated segment", %{backup: backup, target: target} do
      seg = Path.join(backup, "shard-002.seg")
      bytes = File.read!(seg)
      File.write!(seg, binary_part(bytes, 0, byte_size(bytes) - 100))

      {:error, {:backup_damaged, "shard-002.seg", _, why}} =
        refused(backup, target, &match?({:error, {:backup_damaged, "shard-002.seg", _, _}}, &1))

      assert why =~ "truncated"
    end

    test "a segment of another store's backup", %{backup: backup, target: target, dir: dir} do
      other_dir = dir <> "-other"
      other_backup = dir <> "-other-backup"
      {:ok, other} = Kuma.start(name: :"#{Path.basename(dir)}_other", data_dir: other_dir, shards: 3)
      {:ok, 1} = Kuma.append(other, "x", [:y])
      {:ok, _} = Kuma.backup(other, other_backup)
      Kuma.stop(other)
      File.cp!(Path.join(other_backup, "shard-000.seg"), Path.join(backup, "shard-000.seg"))

      {:error, {:backup_damaged, "shard-000.seg", 0, why}} =
        refused(backup, target, &match?({:error, {:backup_damaged, "shard-000.seg", 0, _}}, &1))

      assert why =~ "is of store"
      File.rm_rf!(other_dir)
      File.rm_rf!(other_backup)
    end

    test "a segment swapped for another of the same store", %{store: store, backup: backup, target: target, dir: dir} do
      # Same store, a later backup: each frame is intact, but not the content the manifest
      # names. The shard that got the new event surely changed (the store-wide order may
      # not have recorded it yet, so its file may be the same).
      {:ok, _} = Kuma.append(store, "late", [:event])
      {:ok, shard} = Kuma.shard_for(store, "late")
      seg = "shard-" <> String.pad_leading("#{shard}", 3, "0") <> ".seg"
      later = dir <> "-later"
      {:ok, _} = Kuma.backup(store, later)
      File.cp!(Path.join(later, seg), Path.join(backup, seg))
      File.rm_rf!(later)

      refused(backup, target, &match?({:error, {:backup_damaged, ^seg, _, _}}, &1))
    end

    test "a backup of a newer format, a missing segment, not a backup", %{backup: backup, target: target, dir: dir} do
      manifest = Path.join(backup, "BACKUP")
      text = File.read!(manifest)

      File.write!(manifest, String.replace(text, "backup_format 1", "backup_format 2"))
      refused(backup, target, &match?({:error, {:backup_format, 2, 1}}, &1))

      File.write!(manifest, text |> String.split("\n") |> Enum.reject(&(&1 =~ "shard-002")) |> Enum.join("\n"))
      {:error, {:not_a_backup, _, why}} = refused(backup, target, &match?({:error, {:not_a_backup, _, _}}, &1))
      assert why =~ "shard-002"

      File.rm!(manifest)
      refused(backup, target, &match?({:error, {:not_a_backup, _, _}}, &1))
      refused(dir, target, &match?({:error, {:not_a_backup, _, _}}, &1))
    end

    test "a restore over a data dir that holds files", %{backup: backup, dir: dir} do
      assert {:error, {:restore_target_not_empty, ^dir}} = Kuma.restore(backup, dir)
      assert {:error, {:invalid, :data_dir, _}} = Kuma.restore(backup, "")
    end
  end

  test "backup targets that cannot be used are refused and leave nothing", %{store: store, dir: dir} do
    {:ok, 1} = Kuma.append(store, "a", [:b])
    assert {:error, {:backup_dir_not_empty, ^dir}} = Kuma.backup(store, dir)

    file = dir <> "-a-file"
    File.write!(file, "x")
    assert {:error, {:backup_dir, _, :enotdir} = reason} = Kuma.backup(store, Path.join(file, "backup"))
    assert Kuma.format_error(reason) =~ "not a directory"
    File.rm!(file)

    assert {:error, {:invalid, :keystore, _}} = Kuma.backup(store, dir <> "-x", keystore: :yes)
    assert {:error, {:unknown_option, :compress}} = Kuma.backup(store, dir <> "-x", compress: true)
    refute File.exists?(dir <> "-x")
    assert {:error, {:no_store, :nope}} = Kuma.backup(:nope, dir <> "-x")
  end

  describe "backups and erasure" do
    setup %{store: store, dir: dir} do
      {:ok, 2} = Kuma.append(store, "alice", [{:name, "Alice Liddell"}, {:email, "alice@example.org"}])
      {:ok, 1} = Kuma.append(store, "bob", [{:name, "Bob"}])
      plain = dir <> "-plain"
      with_keys = dir <> "-keys"
      {:ok, %{keystore: false}} = Kuma.backup(store, plain)
      {:ok, %{keystore: true}} = Kuma.backup(store, with_keys, keystore: true)
      {:ok, _} = Kuma.delete(store, "alice")
      :ok = Kuma.stop(store)
      on_exit(fn -> Enum.each([plain, with_keys, dir <> "-r1", dir <> "-r2"], &File.rm_rf!/1) end)
      %{plain: plain, with_keys: with_keys}
    end

    test "restored with the current keystore, an entity erased since stays erased", %{plain: plain, dir: dir} do
      keystore = Path.join(dir, "keystore.kuma")
      target = dir <> "-r1"

      assert {:error, {:invalid, :keystore_path, why}} = Kuma.restore(plain, target)
      assert why =~ "no keystore"
      refute File.exists?(target)

      assert {:ok, %{keystore: :external}} = Kuma.restore(plain, target, keystore_path: keystore)
      {:ok, r} = Kuma.start(name: :"#{Path.basename(dir)}_r1", data_dir: target, shards: 3, keystore_path: keystore)
      assert {:error, :entity_erased} = Kuma.events(r, "alice")
      assert {:ok, [%{data: {:name, "Bob"}}]} = Kuma.events(r, "bob")
      Kuma.stop(r)

      # Nothing of Alice in clear in the backup's files.
      assert files_holding(plain, ["Alice Liddell", "alice@example.org"]) == []
    end

    test "a backup with its keystore reads what it held, erased later or not", %{with_keys: with_keys, dir: dir} do
      target = dir <> "-r2"
      assert {:ok, %{keystore: true}} = Kuma.restore(with_keys, target)
      {:ok, r} = Kuma.start(name: :"#{Path.basename(dir)}_r2", data_dir: target, shards: 3)
      assert {:ok, [%{data: {:name, "Alice Liddell"}}, _]} = Kuma.events(r, "alice")
      Kuma.stop(r)
    end
  end

  @tag store_opts: [shards: 2, encryption: false]
  test "a plain store round-trips", %{store: store, dir: dir, name: name} do
    {:ok, 2} = Kuma.append(store, "p", [:one, :two])
    backup = dir <> "-backup"
    {:ok, %{keystore: false}} = Kuma.backup(store, backup, keystore: true)
    Kuma.stop(store)
    target = dir <> "-restored"
    assert {:ok, %{keystore: false, events: 2}} = Kuma.restore(backup, target)
    {:ok, r} = Kuma.start(name: :"#{name}_p", data_dir: target, shards: 2, encryption: false)
    assert {:ok, [%{data: :one}, %{data: :two}]} = Kuma.events(r, "p")
    Kuma.stop(r)
    File.rm_rf!(backup)
    File.rm_rf!(target)
  end
end
