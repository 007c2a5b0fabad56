defmodule Kuma.ErasureTest do
  # Promise: "Alice closes her account. One entity. One call. Gone." - from the files, the
  # WALs, the keystore, and (crypto-shredding) from copies of the files taken before.
  use Kuma.StoreCase, async: true

  @moduletag store: false

  defp sqlite3!, do: System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")

  defp query(file, sql) do
    {out, 0} = System.cmd(sqlite3!(), [file, sql])
    out |> String.split("\n", trim: true)
  end

  # Every stored ciphertext (or plaintext) of alice, read behind Kuma's back (ids are kept
  # sealed, so she is found as the one entity with an attachment).
  defp stored_blobs(shard) do
    eid = "(SELECT eid FROM events WHERE type = 'attachment')"

    (query(shard, "SELECT hex(payload) FROM events WHERE eid = #{eid};") ++
       query(shard, "SELECT hex(meta) FROM events WHERE eid = #{eid} AND length(meta) > 0;") ++
       query(shard, "SELECT hex(data) FROM snapshots WHERE eid = #{eid};"))
    |> Enum.map(&Base.decode16!/1)
  end

  # 16-byte pieces of a blob: a blob spread over several pages still leaves whole pieces.
  defp pieces(blob), do: for(<<piece::binary-size(16) <- blob>>, do: piece)

  defp hits(dir, needles) do
    for file <- files_under(dir), bytes = File.read!(file), needle <- needles, String.contains?(bytes, needle) do
      {Path.relative_to(file, dir), needle}
    end
  end

  defp write_alice_and_bob(store, alice, marker) do
    alice_entity = Kuma.entity(store, alice)

    for i <- 1..12 do
      {:ok, _} = Kuma.append(alice_entity, [{:noted, "#{marker} note #{i}"}], metadata: %{by: marker})
    end

    # Big enough for SQLite overflow pages.
    big = marker <> :crypto.strong_rand_bytes(20_000) <> marker
    {:ok, 13} = Kuma.append(alice_entity, {:attachment, big})

    for i <- 1..20, do: {:ok, _} = Kuma.append(store, "bob", {:deposited, i})
    :ok = Kuma.flush(store)
  end

  for encryption <- [true, false] do
    @tag :sqlite3_cli
    @tag encryption: encryption
    test "erasure leaves no trace in any file (encryption: #{encryption})", %{dir: dir, name: name, encryption: enc} do
      opts = [name: name, data_dir: dir, shards: 1, snapshot_every: 5, encryption: enc]
      alice = "alice-#{System.unique_integer([:positive])}"
      marker = "MARKER-#{Base.encode16(:crypto.strong_rand_bytes(8))}"

      {:ok, store} = Kuma.start(opts)
      write_alice_and_bob(store, alice, marker)
      {:ok, bob_before} = Kuma.events(store, "bob")
      :ok = Kuma.stop(store)

      shard = Path.join(dir, "shards/000.kuma")
      blobs = stored_blobs(shard)
      # 13 payloads, 12 metadata, 2 snapshots (at 5 and 10).
      assert length(blobs) == 27
      needles = Enum.flat_map(blobs, &pieces/1)

      keystore = Path.join(dir, "keystore.kuma")
      keys_before = if enc, do: query(keystore, "SELECT hex(wrapped) FROM keys;"), else: []

      # The scan finds what is there: before the delete the blobs are in the files, and the
      # marker is in clear exactly when the store does not encrypt.
      assert hits(dir, Enum.map(blobs, &binary_part(&1, 0, 16))) != []
      assert hits(dir, [marker]) != [] == not enc

      {:ok, store} = Kuma.start(opts)
      assert {:ok, %{events_deleted: 13}} = Kuma.delete(store, alice)
      :ok = Kuma.stop(store)

      assert hits(dir, [marker]) == []
      assert hits(dir, [alice]) == []
      assert hits(dir, needles) == []

      if enc do
        keys_after = query(keystore, "SELECT hex(wrapped) FROM keys;")
        assert [gone] = keys_before -- keys_after
        assert length(keys_after) == length(keys_before) - 1
        assert hits(dir, gone |> Base.decode16!() |> pieces()) == []
      end

      # Everything else is intact.
      {:ok, store} = Kuma.start(opts)
      assert {:ok, bob_before} == Kuma.events(store, "bob")
      assert {:ok, %{events: 20}} = Kuma.verify(store, "bob")
      assert {:ok, %{entities: 1, events: 20}} = Kuma.verify_store(store)
      assert {:error, :entity_erased} = Kuma.events(store, alice)
      assert {:ok, true} = Kuma.erased?(store, alice)
      assert {:ok, false} = Kuma.erased?(store, "bob")
      # On a single node an erasure is complete once delete returns.
      me = node()
      assert {:ok, %{complete: true, members: %{^me => :done}}} = Kuma.erasure_status(store, alice)
      assert {:ok, %{complete: false, members: %{^me => :not_applied}}} = Kuma.erasure_status(store, "bob")
      assert {:error, {:invalid, :entity_id, _}} = Kuma.erasure_status(store, "")
    end
  end

  # Copies the stopped store's data dir to `backup` (shards and manifest, not the keystore:
  # it is backed up on its own terms), erases `id` in the store, and opens the copy with the
  # store's live keystore.
  defp backup_then_erase(opts, backup, id) do
    dir = opts[:data_dir]
    File.cp_r!(dir, backup)
    for f <- Path.wildcard(Path.join(backup, "keystore.*")), do: File.rm!(f)
    {:ok, store} = Kuma.start(opts)
    {:ok, _} = Kuma.delete(store, id)
    :ok = Kuma.stop(store)
    Kuma.start(Keyword.merge(opts, data_dir: backup, keystore_path: Path.join(dir, "keystore.kuma")))
  end

  test "a copy of the files taken before the erasure cannot be read with the current keystore",
       %{dir: dir, name: name} do
    backup = dir <> "-backup"
    on_exit(fn -> File.rm_rf!(backup) end)
    opts = [name: name, data_dir: dir, shards: 2]
    marker = "MARKER-#{Base.encode16(:crypto.strong_rand_bytes(8))}"

    {:ok, store} = Kuma.start(opts)
    write_alice_and_bob(store, "alice", marker)
    for i <- 1..5, do: {:ok, _} = Kuma.append(store, "carol-#{i}", {:opened, i})
    :ok = Kuma.stop(store)

    {:ok, copy} = backup_then_erase(opts, backup, "alice")
    # Alice's ciphertexts are all in the copy, intact, and useless.
    assert {:ok, %{events: 13}} = Kuma.verify(copy, "alice")
    assert {:error, :entity_erased} = Kuma.events(copy, "alice")
    assert {:error, :entity_erased} = Kuma.export(copy, "alice")
    assert hits(backup, [marker]) == []
    # Everyone else reads as before.
    assert {:ok, bob} = Kuma.events(copy, "bob")
    assert Enum.map(bob, & &1.data) == for(i <- 1..20, do: {:deposited, i})
    for i <- 1..5, do: assert({:ok, [%{data: {:opened, ^i}}]} = Kuma.events(copy, "carol-#{i}"))
  end

  test "a restored copy from before an erasure cannot bring the erased id back", %{dir: dir, name: name} do
    backup = dir <> "-restored"
    on_exit(fn -> File.rm_rf!(backup) end)
    opts = [name: name, data_dir: dir, shards: 2]
    {:ok, store} = Kuma.start(opts)
    {:ok, 1} = Kuma.append(store, "alice", {:opened, %{}})
    {:ok, 1} = Kuma.append(store, "bob", {:paid, Kuma.sensitive("alice", "Alice Liddell", placeholder: "A.")})
    :ok = Kuma.stop(store)

    # The old shards come with the live keystore: its tombstone keeps Alice erased, and no
    # new key is made for her (one would break every sealed value about her).
    {:ok, copy} = backup_then_erase(opts, backup, "alice")
    assert {:error, :entity_erased} = Kuma.append(copy, "alice", {:back, 1})
    assert {:error, {:subject_erased, "alice"}} = Kuma.append(copy, "bob", {:paid, Kuma.sensitive("alice", "again")})
    assert {:error, :entity_erased} = Kuma.events(copy, "alice")
    assert {:ok, [%{data: {:paid, paid}}]} = Kuma.events(copy, "bob")
    assert Kuma.Sensitive.value(paid) == "A."
    :ok = Kuma.stop(copy)

    {:ok, store} = Kuma.start(opts)
    assert {:ok, [%{data: {:paid, paid}}]} = Kuma.events(store, "bob")
    assert Kuma.Sensitive.value(paid) == "A."
    assert {:error, :entity_erased} = Kuma.append(store, "alice", {:back, 2})
  end

  test "compact gives the space of erased entities back and keeps everything else", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2)
    big = String.duplicate("x", 2_000)
    for e <- 1..40, do: {:ok, _} = Kuma.append(store, "c#{e}", for(i <- 1..50, do: {:e, i, big}))
    for e <- 1..30, do: {:ok, %{events_deleted: 50}} = Kuma.delete(store, "c#{e}")
    :ok = Kuma.flush(store)
    size = fn -> Path.wildcard(Path.join(dir, "shards/*.kuma")) |> Enum.map(&File.stat!(&1).size) |> Enum.sum() end
    before = size.()
    parent = self()
    assert {:ok, %{shards: 2}} = Kuma.compact(store, on_progress: &send(parent, {:compacted, &1, &2}))
    assert_received {:compacted, 0, 2}
    assert_received {:compacted, 1, 2}
    assert size.() < before / 2
    for e <- 31..40, do: assert({:ok, %{events: 50}} = Kuma.verify(store, "c#{e}"))
    assert {:ok, %{events: 500}} = Kuma.verify_store(store)
    assert {:ok, 51} = Kuma.append(store, "c40", :after)
    assert {:error, {:unknown_option, :typo}} = Kuma.compact(store, typo: 1)
    :ok = Kuma.stop(store)
  end

  describe "delete/2 on a running store" do
    setup %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Bank.Account])
      %{store: store}
    end

    test "stops the live entity, refuses the id afterwards, and is idempotent", %{store: store} do
      account = Kuma.entity(store, Bank.Account, "acct-1")
      {:ok, 1} = Kuma.execute(account, {:deposit, 10})
      pid = Kuma.Entity.whereis(store, "acct-1")
      assert is_pid(pid)
      ref = Process.monitor(pid)

      assert {:ok, %{events_deleted: 1}} = Kuma.delete(account)
      assert_received {:DOWN, ^ref, :process, ^pid, _}
      assert :ets.lookup(store.entities, "acct-1") == []

      assert {:error, :entity_erased} = Kuma.execute(account, {:deposit, 5})
      assert {:error, :entity_erased} = Kuma.append(store, "acct-1", {:deposited, 1})
      assert {:error, :entity_erased} = Kuma.head(store, "acct-1")

      # Each call starts a process that fails to load; the caller always gets the reason,
      # never "the process is gone" (it used to, when the load failed before the call).
      for _ <- 1..200, do: assert({:error, :entity_erased} = Kuma.fetch(account))

      assert {:error, {:partial, [{:error, :entity_erased}, {:ok, 1}]}} =
               Kuma.append_batch(store, [{"acct-1", [:x]}, {"acct-2", [:y]}])

      # Whatever seq the caller expects (found by the model test: a mismatch used to win,
      # sending the caller to retry with the "right" seq).
      for expected <- [0, 1, 7] do
        assert {:error, :entity_erased} = Kuma.append(store, "acct-1", {:deposited, 1}, expected_seq: expected)

        assert {:error, {:partial, [{:error, :entity_erased}]}} =
                 Kuma.append_batch(store, [{"acct-1", [:x], [expected_seq: expected]}])
      end

      assert {:ok, %{events_deleted: 0}} = Kuma.delete(store, "acct-1")
      assert Kuma.format_error(:entity_erased) =~ "erased"
    end

    test "an id that never existed is reserved too", %{store: store} do
      assert {:ok, %{events_deleted: 0}} = Kuma.delete(store, "never")
      assert {:error, :entity_erased} = Kuma.append(store, "never", :hello)
    end

    test "bad input is refused", %{store: store} do
      assert {:error, {:invalid, :entity_id, _}} = Kuma.delete(store, "")
      assert {:error, {:unknown_option, :bogus}} = Kuma.delete(store, "x", bogus: 1)
      assert {:error, {:no_store, :nope}} = Kuma.delete(:nope, "x")
    end

    test "forget listeners are told and awaited", %{store: store, name: name} do
      {:ok, 1} = Kuma.append(store, "dana", :hello)
      test = self()

      listener =
        spawn_link(fn ->
          :ok = Kuma.Erasure.listen(store)
          send(test, :listening)

          receive do
            {:kuma_forget, ^name, id, reply_to} ->
              send(test, {:forgot, id})
              Kuma.Erasure.forgotten(reply_to)
          end

          Process.sleep(:infinity)
        end)

      assert_receive :listening
      assert {:ok, %{events_deleted: 1}} = Kuma.delete(store, "dana")
      assert_received {:forgot, "dana"}
      Process.unlink(listener)
      ref = Process.monitor(listener)
      Process.exit(listener, :kill)
      assert_receive {:DOWN, ^ref, _, _, _}

      # A listener that never answers is reported, after the data is gone.
      silent =
        spawn_link(fn ->
          :ok = Kuma.Erasure.listen(store)
          send(test, :listening)
          Process.sleep(:infinity)
        end)

      assert_receive :listening
      {:ok, 1} = Kuma.append(store, "erin", :hello)
      assert {:error, {:forget_unconfirmed, [^silent]}} = Kuma.delete(store, "erin", forget_timeout: 100)
      assert {:ok, true} = Kuma.erased?(store, "erin")
    end
  end
end
