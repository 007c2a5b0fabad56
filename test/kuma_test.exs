defmodule KumaTest do
  use Kuma.StoreCase, async: true

  describe "append and read" do
    test "appends are numbered per entity and read back in order", %{store: store} do
      assert {:ok, 2} = Kuma.append(store, "alice", [{:opened, %{}}, {:credited, %{amount: 50}}])
      assert {:ok, 3} = Kuma.append(store, "alice", {:debited, %{amount: 20}}, metadata: %{by: "teller"})
      assert {:ok, 1} = Kuma.append(store, "bob", {:opened, %{}})

      events = Kuma.stream(store, "alice") |> Enum.to_list()
      assert Enum.map(events, & &1.seq) == [1, 2, 3]
      assert Enum.map(events, & &1.type) == ["opened", "credited", "debited"]
      assert Enum.map(events, & &1.data) == [{:opened, %{}}, {:credited, %{amount: 50}}, {:debited, %{amount: 20}}]
      assert Enum.map(events, & &1.metadata) == [%{}, %{}, %{by: "teller"}]
      assert Enum.all?(events, &(byte_size(&1.hash) == 32 and &1.entity_id == "alice"))

      assert events
             |> Enum.map(& &1.timestamp)
             |> Enum.chunk_every(2, 1, :discard)
             |> Enum.all?(fn [a, b] -> a <= b end)

      {:ok, shard} = Kuma.shard_for(store, "alice")
      assert Enum.all?(events, &(&1.shard == shard))
      assert events |> Enum.map(& &1.position) |> Enum.chunk_every(2, 1, :discard) |> Enum.all?(fn [a, b] -> a < b end)
    end

    test "stream is lazy, chunked and starts where asked", %{store: store} do
      {:ok, 1200} = Kuma.append(store, "big", Enum.to_list(1..1200))
      assert Kuma.stream(store, "big", chunk: 7) |> Enum.map(& &1.data) == Enum.to_list(1..1200)
      assert Kuma.stream(store, "big", from: 1190, chunk: 3) |> Enum.map(& &1.seq) == Enum.to_list(1190..1200)
      assert Kuma.stream(store, "big", chunk: 5) |> Enum.take(3) |> Enum.map(& &1.seq) == [1, 2, 3]
      assert Kuma.stream(store, "nobody") |> Enum.to_list() == []
      assert {:ok, events} = Kuma.events(store, "big", from: 500, limit: 10)
      assert Enum.map(events, & &1.seq) == Enum.to_list(500..509)
      assert {:ok, []} = Kuma.events(store, "nobody")
    end

    test "struct events get their module as type", %{store: store} do
      {:ok, 1} = Kuma.append(store, "u", %URI{host: "example.org"})
      assert [%Kuma.Envelope{type: "URI", data: %URI{host: "example.org"}}] = Enum.to_list(Kuma.stream(store, "u"))
    end

    test "head reports the last event", %{store: store} do
      assert {:ok, nil} = Kuma.head(store, "h")
      {:ok, 2} = Kuma.append(store, "h", [1, 2])
      {:ok, %{seq: 2, hash: hash}} = Kuma.head(store, "h")
      assert [_, %{hash: ^hash}] = Enum.to_list(Kuma.stream(store, "h"))
    end

    test "read_shard returns events in position order with no gaps", %{store: store} do
      for i <- 1..50, do: {:ok, _} = Kuma.append(store, "e#{rem(i, 9)}", i)

      all =
        for shard <- 0..3, reduce: [] do
          acc ->
            {:ok, events} = Kuma.read_shard(store, shard, 0, 1000)
            assert Enum.map(events, & &1.position) == Enum.to_list(1..length(events))
            assert Enum.all?(events, &(&1.shard == shard))
            acc ++ events
        end

      assert all |> Enum.map(& &1.data) |> Enum.sort() == Enum.to_list(1..50)
      {:ok, tail} = Kuma.read_shard(store, 0, 2, 1)
      assert [%{position: 3}] = tail
    end
  end

  describe "optimistic concurrency" do
    test "a stale expected_seq writes nothing", %{store: store} do
      assert {:ok, 1} = Kuma.append(store, "acct", :a, expected_seq: 0)
      assert {:error, {:wrong_expected_seq, 0, 1}} = Kuma.append(store, "acct", [:b, :c], expected_seq: 0)
      assert {:ok, 2} = Kuma.append(store, "acct", :b, expected_seq: 1)
      assert {:error, {:wrong_expected_seq, 5, 0}} = Kuma.append(store, "fresh", :x, expected_seq: 5)
      assert seqs(store, "acct") == [1, 2]
      assert {:ok, nil} = Kuma.head(store, "fresh")
    end

    test "concurrent appends with the same expected_seq: exactly one wins", %{store: store} do
      {:ok, 1} = Kuma.append(store, "race", :init)

      results =
        1..50
        |> Enum.map(fn i -> Task.async(fn -> Kuma.append(store, "race", {:try, i}, expected_seq: 1) end) end)
        |> Enum.map(&Task.await/1)

      assert Enum.count(results, &match?({:ok, 2}, &1)) == 1
      assert Enum.count(results, &match?({:error, {:wrong_expected_seq, 1, 2}}, &1)) == 49
      assert seqs(store, "race") == [1, 2]
    end
  end

  describe "append_batch" do
    test "writes many entities and reports per entry", %{store: store} do
      entries = for i <- 1..300, do: {"batch-#{i}", [i, i + 1]}
      assert {:ok, seqs} = Kuma.append_batch(store, entries)
      assert seqs == List.duplicate(2, 300)
      assert seqs(store, "batch-7") == [1, 2]

      assert {:error, {:partial, [{:error, {:wrong_expected_seq, 0, 2}}, {:ok, 1}]}} =
               Kuma.append_batch(store, [{"batch-1", [:x], expected_seq: 0}, {"other", :y, metadata: %{m: 1}}])

      assert seqs(store, "batch-1") == [1, 2]
      assert [%{metadata: %{m: 1}}] = Enum.to_list(Kuma.stream(store, "other"))
    end

    test "one invalid entry refuses the whole batch", %{store: store} do
      assert {:error, {:invalid, :entity_id, _}} = Kuma.append_batch(store, [{"ok", [1]}, {"", [2]}])
      assert {:error, {:invalid, :events, _}} = Kuma.append_batch(store, [{"ok", [1]}, {"x", []}])
      assert {:error, {:invalid, :entries, _}} = Kuma.append_batch(store, [{"ok", [1]}, :nope])
      assert {:error, {:invalid, :entries, _}} = Kuma.append_batch(store, [])
      assert {:ok, nil} = Kuma.head(store, "ok")
    end

    test "large batches take the dirty-scheduler path and stay correct", %{store: store} do
      entries = for i <- 1..40, do: {"bulk-#{i}", Enum.map(1..100, &{:e, &1})}
      assert {:ok, seqs} = Kuma.append_batch(store, entries)
      assert Enum.all?(seqs, &(&1 == 100))
      big = :binary.copy("x", 300_000)
      assert {:ok, 1} = Kuma.append(store, "large", big)
      assert [%{data: ^big}] = Enum.to_list(Kuma.stream(store, "large"))
    end
  end

  describe "bad input changes nothing" do
    test "ids, events, options and limits", %{store: store} do
      assert {:error, {:invalid, :entity_id, _}} = Kuma.append(store, "", :x)
      assert {:error, {:invalid, :entity_id, _}} = Kuma.append(store, :alice, :x)
      assert {:error, {:invalid, :entity_id, _}} = Kuma.append(store, 123, :x)
      assert {:error, {:too_large, :entity_id, 513, 512}} = Kuma.append(store, :binary.copy("a", 513), :x)
      assert {:error, {:invalid, :events, _}} = Kuma.append(store, "a", [])
      assert {:error, {:invalid, :metadata, _}} = Kuma.append(store, "a", :x, metadata: [:not_a_map])
      assert {:error, {:invalid, :expected_seq, _}} = Kuma.append(store, "a", :x, expected_seq: -1)
      assert {:error, {:unknown_option, :expect}} = Kuma.append(store, "a", :x, expect: 1)
      assert {:error, {:too_large, :event_type, _, 255}} = Kuma.append(store, "a", {String.duplicate("t", 256), 1})
      assert {:error, {:too_large, :payload, _, _}} = Kuma.append(store, "a", :binary.copy("p", 9 * 1024 * 1024))
      assert {:error, {:invalid, :event_type, _}} = Kuma.append(store, "a", {<<0xFF, 0xFE>>, 1})
      assert {:error, {:invalid, :store, _}} = Kuma.append("not a store", "a", :x)
      assert {:error, {:invalid, :shard, _}} = Kuma.read_shard(store, -1, 0)
      assert {:error, {:invalid, :shard, _}} = Kuma.read_shard(store, 99, 0)
      assert_raise ArgumentError, fn -> Kuma.stream(store, "") end
      assert {:ok, nil} = Kuma.head(store, "a")
      assert {:ok, %{events: 0}} = Kuma.verify_store(store)
    end

    test "bad timeouts, positions and limits are refused before anything is written", %{store: store} do
      entity = Kuma.entity(store, "ent")

      for timeout <- [-1, :soon, 1.5] do
        assert {:error, {:invalid, :timeout, _}} = Kuma.append(store, "t", :x, timeout: timeout)
        assert {:error, {:invalid, :timeout, _}} = Kuma.append_batch(store, [{"t", :x}], timeout: timeout)
        assert {:error, {:invalid, :timeout, _}} = Kuma.append(entity, :x, timeout: timeout)
        assert {:error, {:invalid, :timeout, _}} = Kuma.delete(store, "t", timeout: timeout)
        assert {:error, {:invalid, :forget_timeout, _}} = Kuma.delete(store, "t", forget_timeout: timeout)
      end

      assert {:ok, nil} = Kuma.head(store, "t")
      assert {:ok, false} = Kuma.erased?(store, "t")
      {:ok, 1} = Kuma.append(store, "t", :one)

      for opts <- [[from: -1], [from: 0], [from: :start], [limit: -1], [limit: :all]] do
        assert {:error, {:invalid, _, _}} = Kuma.events(store, "t", opts)
        assert {:error, {:invalid, _, _}} = Kuma.history(entity, opts)
      end

      assert {:ok, [%{seq: 1}]} = Kuma.events(store, "t", from: 1, limit: :infinity)
      assert {:ok, []} = Kuma.events(store, "t", limit: 0)
    end

    test "a live entity refuses the same bad appends as storage does", %{store: store} do
      # (Found by the model test: an empty append to a live entity answered {:ok, seq}.)
      {:ok, 1} = Kuma.append(store, "live", :one)
      {:ok, :one} = store |> Kuma.entity("live") |> Kuma.fetch()
      assert is_pid(Kuma.Entity.whereis(store, "live"))

      for id <- ["live", "cold"] do
        assert {:error, {:invalid, :events, _}} = Kuma.append(store, id, [])
        assert {:error, {:invalid, :expected_seq, _}} = Kuma.append(store, id, :x, expected_seq: -3)
        assert {:error, {:invalid, :expected_seq, _}} = Kuma.append(store, id, :x, expected_seq: :latest)
        assert {:error, {:invalid, :expected_seq, _}} = store |> Kuma.entity(id) |> Kuma.execute(:x, expected_seq: -1)
        assert {:error, {:invalid, :return, _}} = Kuma.append(store, id, :x, return: :everything)
      end

      assert {:ok, %{seq: 1}} = Kuma.head(store, "live")
      assert {:ok, nil} = Kuma.head(store, "cold")
    end

    test "an event that does not decode is an error tuple, not an exception", %{store: store} do
      ref = make_ref()
      {:ok, :ok} = Kuma.Native.write_append(store.native, ref, "bad", nil, [{"", <<>>, <<131, 255, 1>>, nil}])
      assert_receive {:kuma_reply, ^ref, {:ok, _}}
      assert {:error, {:decode_failed, 1, :malformed}} = Kuma.events(store, "bad")
      assert {:error, {:decode_failed, 1, :malformed}} = Kuma.query(store, id_prefix: "bad")
      assert_raise Kuma.DecodeError, fn -> Enum.to_list(Kuma.stream(store, "bad")) end
    end

    test "answers that come after their timeout do not pile up in the caller's mailbox", %{store: store} do
      results = for i <- 1..2_000, do: Kuma.append(store, "late-#{rem(i, 50)}", {:e, i}, timeout: 0)
      assert Enum.count(results, &(&1 == {:error, :timeout})) > 1_000
      :ok = Kuma.flush(store)
      # Every late answer has arrived by now; the next write drops them.
      {:ok, _} = Kuma.append(store, "one-more", :e)
      {:messages, messages} = Process.info(self(), :messages)
      assert Enum.count(messages, &match?({:kuma_reply, _, _}, &1)) == 0
      # What timed out may still have been written: a timeout promises nothing either way.
      total = for(n <- 0..49, {:ok, events} = Kuma.events(store, "late-#{n}"), do: length(events)) |> Enum.sum()
      assert total == 2_000
    end

    test "a stopped store answers with clear errors", %{store: store, name: name} do
      {:ok, 1} = Kuma.append(store, "a", :x)
      assert :ok = Kuma.stop(store)
      assert {:error, :store_closed} = Kuma.append(store, "a", :y)
      assert {:error, :store_closed} = Kuma.append_batch(store, [{"a", :y}])
      assert {:error, :store_closed} = Kuma.events(store, "a")
      assert {:error, :store_closed} = Kuma.verify(store, "a")
      assert {:error, :store_closed} = Kuma.flush(store)
      assert {:error, {:no_store, ^name}} = Kuma.append(name, "a", :y)
      assert {:error, {:no_store, ^name}} = Kuma.stop(name)
      assert_raise Kuma.Error, ~r/stopped/, fn -> Enum.to_list(Kuma.stream(store, "a")) end
    end
  end

  describe "a panic in Rust" do
    test "inside a NIF becomes an error tuple", _ do
      assert {:error, {:panic, message}} = Kuma.Native.fault_panic()
      assert message =~ "fault injection"
    end

    test "inside a shard writer fails that append only; the store keeps working", %{store: store} do
      {:ok, 1} = Kuma.append(store, "p", :before)
      assert {:error, {:panic, _}} = Kuma.append(store, "p", [:lost, {"__kuma_fault_panic__", nil}])
      assert {:ok, 2} = Kuma.append(store, "p", :after, expected_seq: 1)
      assert Enum.map(Kuma.stream(store, "p"), & &1.data) == [:before, :after]
      assert {:ok, %{events: 2}} = Kuma.verify(store, "p")
    end
  end

  describe "stores" do
    @describetag store: false

    test "start requires a data dir and valid options", %{dir: dir} do
      assert {:error, {:invalid, :data_dir, "is required"}} = Kuma.start(name: :x)
      assert {:error, {:invalid, :shards, _}} = Kuma.start(data_dir: dir, shards: 0)
      assert {:error, {:invalid, :sync, _}} = Kuma.start(data_dir: dir, sync: :sometimes)
      assert {:error, {:invalid, :name, _}} = Kuma.start(data_dir: dir, name: "str")
      assert {:error, {:unknown_option, :shard}} = Kuma.start(data_dir: dir, shard: 8)
    end

    test "shards can share writer threads", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 6, writer_threads: 2)
      entries = for i <- 1..60, do: {"wt:#{i}", [i, i]}
      assert {:ok, seqs} = Kuma.append_batch(store, entries)
      assert Enum.all?(seqs, &(&1 == 2))
      assert {:ok, %{events: 120, entities: 60}} = Kuma.verify_store(store)
      assert {:error, {:invalid, :writer_threads, _}} = Kuma.start(name: :wt2, data_dir: dir <> "x", writer_threads: 0)
    end

    test "two stores in one VM do not interfere", %{dir: dir} do
      {:ok, a} = Kuma.start(name: :iso_a, data_dir: Path.join(dir, "a"), shards: 2)
      {:ok, b} = Kuma.start(name: :iso_b, data_dir: Path.join(dir, "b"), shards: 3)
      {:ok, 1} = Kuma.append(a, "same-id", :in_a)
      {:ok, 1} = Kuma.append(b, "same-id", :in_b)
      {:ok, 2} = Kuma.append(:iso_b, "same-id", :in_b_again)
      assert Enum.map(Kuma.stream(a, "same-id"), & &1.data) == [:in_a]
      assert Enum.map(Kuma.stream(:iso_b, "same-id"), & &1.data) == [:in_b, :in_b_again]
      :ok = Kuma.stop(a)
      assert {:ok, 3} = Kuma.append(b, "same-id", :still_fine)
      assert {:error, {:already_started, :iso_b}} = Kuma.start(name: :iso_b, data_dir: Path.join(dir, "c"))
      :ok = Kuma.stop(b)
    end

    test "data survives stop and start; the shard count is fixed", %{dir: dir, name: name} do
      {:ok, _} = Kuma.start(name: name, data_dir: dir, shards: 8)
      {:ok, 3} = Kuma.append(name, "keep", [1, 2, 3])
      :ok = Kuma.stop(name)
      assert {:error, {:shard_count_mismatch, 8, 16}} = Kuma.start(name: name, data_dir: dir)
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 8)
      assert seqs(store, "keep") == [1, 2, 3]
      assert {:ok, 4} = Kuma.append(store, "keep", 4, expected_seq: 3)
    end

    test "a data dir cannot be opened twice, also after its LOCK file is deleted", %{dir: dir, name: name} do
      {:ok, _} = Kuma.start(name: name, data_dir: dir, shards: 2)
      assert {:error, {:data_dir_locked, _}} = Kuma.start(name: :second_opener, data_dir: dir, shards: 2)
      File.rm!(Path.join(dir, "LOCK"))
      assert {:error, {:data_dir_locked, _}} = Kuma.start(name: :second_opener, data_dir: dir, shards: 2)
      # The keystore is held too, by itself: a copy of the data dir cannot share it.
      copy = dir <> "-copy"
      on_exit(fn -> File.rm_rf!(copy) end)
      File.mkdir_p!(copy)
      File.cp_r!(Path.join(dir, "shards"), Path.join(copy, "shards"))
      File.cp!(Path.join(dir, "KUMA"), Path.join(copy, "KUMA"))
      keystore = Path.join(dir, "keystore.kuma")

      assert {:error, {:data_dir_locked, ^keystore}} =
               Kuma.start(name: :second_opener, data_dir: copy, shards: 2, keystore_path: keystore)
    end

    test "files are created for the owner only (0600, directories 0700) unless told otherwise", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, projections: [{Kuma.Test.Counter, name: :modes}])
      {:ok, _, token} = Kuma.append(store, "a", :e, return: :token)
      :ok = Kuma.Projection.wait_for(:modes, token)
      # While open, with the WAL and shared-memory files there too.
      modes = fn ->
        for path <- [dir | Path.wildcard(Path.join(dir, "**"), match_dot: true)] do
          %File.Stat{mode: mode, type: type} = File.stat!(path)
          {Path.relative_to(path, dir), type, Bitwise.band(mode, 0o777)}
        end
      end

      found = modes.()
      assert Enum.any?(found, fn {path, _, _} -> String.ends_with?(path, "-wal") end)
      assert Enum.any?(found, fn {path, _, _} -> String.ends_with?(path, ".sqlite") end)

      for {path, type, mode} <- found do
        assert mode == if(type == :directory, do: 0o700, else: 0o600), "#{path}: #{Integer.to_string(mode, 8)}"
      end

      :ok = Kuma.stop(store)
      other = dir <> "-group"
      on_exit(fn -> File.rm_rf!(other) end)
      {:ok, store} = Kuma.start(name: name, data_dir: other, shards: 1, file_mode: 0o640)
      assert Bitwise.band(File.stat!(Path.join(other, "shards/000.kuma")).mode, 0o777) == 0o640
      assert Bitwise.band(File.stat!(Path.join(other, "shards")).mode, 0o777) == 0o750
      :ok = Kuma.stop(store)
    end

    test "foreign, corrupt and missing shard files are refused", %{dir: dir, name: name} do
      {:ok, _} = Kuma.start(name: name, data_dir: dir, shards: 2)
      {:ok, 1} = Kuma.append(name, "x", 1)
      :ok = Kuma.stop(name)
      shard = Path.join(dir, "shards/001.kuma")
      original = File.read!(shard)
      File.write!(shard, :binary.copy("garbage!", 1024))
      assert {:error, {:foreign_file, ^shard, _}} = Kuma.start(name: name, data_dir: dir, shards: 2)
      File.rm!(shard)
      assert {:error, {:missing_shard, ^shard}} = Kuma.start(name: name, data_dir: dir, shards: 2)
      File.write!(shard, original)
      assert {:ok, _} = Kuma.start(name: name, data_dir: dir, shards: 2)
    end

    test "an unwritable data dir is a clear error", %{dir: dir, name: name} do
      File.mkdir_p!(dir)
      File.write!(Path.join(dir, "a_file"), "x")
      assert {:error, {:storage, "create data dir", _}} = Kuma.start(name: name, data_dir: Path.join(dir, "a_file/sub"))
    end

    test "works as a child spec and restarts after a crash", %{dir: dir, name: name} do
      {:ok, sup} = Supervisor.start_link([{Kuma, name: name, data_dir: dir, shards: 2}], strategy: :one_for_one)
      {:ok, 1} = Kuma.append(name, "c", :one)
      owner = Kuma.Store.whereis(name, :owner)
      {:ok, %{native: old_native}} = Kuma.Store.lookup(name)
      Process.exit(owner, :kill)
      # The supervisor restarts the owner, which closes the old handle and reopens the shards.
      assert eventually(fn -> match?({:ok, %{native: n}} when n != old_native, Kuma.Store.lookup(name)) end)
      assert {:error, :store_closed} = Kuma.Native.write_flush(old_native)
      assert {:ok, 2} = Kuma.append(name, "c", :two)
      assert seqs(name, "c") == [1, 2]
      Supervisor.stop(sup)
      assert {:error, {:no_store, ^name}} = Kuma.append(name, "c", :three)
    end
  end
end
