defmodule Kuma.ProtectionTest do
  # Encryption at rest, master keys, sensitive values of one subject inside another
  # entity's stream, and export.
  use Kuma.StoreCase, async: true

  @moduletag store: false

  @key_a String.duplicate("a1", 32)
  @key_b String.duplicate("b2", 32)

  defp contents(dir), do: Map.new(files_under(dir), &{&1, File.read!(&1)})

  describe "master key" do
    test "the wrong key fails clearly and changes nothing; the right one opens", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key: @key_a)
      {:ok, 2} = Kuma.append(store, "alice", [:opened, {:credited, 5}])
      :ok = Kuma.stop(store)
      before = contents(dir)

      assert {:error, :wrong_master_key} = Kuma.start(name: name, data_dir: dir, master_key: @key_b)
      assert contents(dir) == before
      assert Kuma.format_error(:wrong_master_key) =~ "master key"

      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key: Base.decode16!(@key_a, case: :lower))
      assert {:ok, [%{data: :opened}, %{data: {:credited, 5}}]} = Kuma.events(store, "alice")
    end

    test "from a key file or an environment variable; never written to the data dir", %{dir: dir, name: name} do
      key_file = dir <> ".key"
      on_exit(fn -> File.rm(key_file) end)
      File.write!(key_file, Base.encode64(Base.decode16!(@key_a, case: :lower)) <> "\n")
      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key_file: key_file)
      {:ok, 1} = Kuma.append(store, "alice", :opened)
      :ok = Kuma.stop(store)

      var = "KUMA_TEST_KEY_#{System.unique_integer([:positive])}"
      System.put_env(var, @key_a)
      on_exit(fn -> System.delete_env(var) end)
      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key_env: var)
      assert {:ok, [%{data: :opened}]} = Kuma.events(store, "alice")
      :ok = Kuma.stop(store)

      raw = Base.decode16!(@key_a, case: :lower)

      for {file, bytes} <- contents(dir), needle <- [raw, @key_a, Base.encode64(raw)] do
        refute String.contains?(bytes, needle), "#{file} holds the master key"
      end
    end

    test "missing or malformed keys are refused before anything is created", %{dir: dir, name: name} do
      assert {:error, {:missing_master_key, why}} =
               Kuma.start(name: name, data_dir: dir, master_key_env: "KUMA_TEST_NO_SUCH_VAR")

      assert why =~ "KUMA_TEST_NO_SUCH_VAR"
      assert {:error, {:invalid, :master_key, _}} = Kuma.start(name: name, data_dir: dir, master_key: "short")

      assert {:error, {:invalid, :master_key_file, _}} =
               Kuma.start(name: name, data_dir: dir, master_key_file: "/nonexistent/kuma.key")

      refute File.exists?(dir)
    end

    test "no error, state, child spec or crash report holds the key", %{dir: dir, name: name} do
      key = :crypto.strong_rand_bytes(32)
      base = [name: name, data_dir: dir, master_key: key]

      # Options the native layer would have refused with the options in its stack trace.
      for bad <- [
            [data_dir: <<255, 0, 1>>],
            [keystore_path: <<200, 201>>],
            [writer_threads: 4_000_000_000],
            [shards: -1]
          ] do
        assert {:error, reason} = Kuma.start(Keyword.merge(base, bad))
        refute holds?(reason, key), "#{inspect(bad)}: the error holds the key"
      end

      {:ok, _} = Kuma.start(base)

      for role <- [:supervisor, :owner, :feed, :reaper] do
        pid = Kuma.Store.whereis(name, role)
        refute holds?(:sys.get_state(pid), key), "#{role}'s state holds the key"
      end

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          owner = Kuma.Store.whereis(name, :owner)
          Process.exit(owner, :kill)
          # The restarted owner found its key again (meanwhile writes answer :store_closed).
          assert eventually(fn -> match?({:ok, 1}, Kuma.append(name, "after-restart", :ok)) end)
        end)

      for encoded <- [key, Base.encode16(key), Base.encode16(key, case: :lower), Base.encode64(key)] do
        refute log =~ encoded
      end

      :ok = Kuma.stop(name)
    end

    # Whether `term` holds `key` anywhere: in binaries (raw, hex or base64), lists, tuples,
    # maps, or the environment of a function.
    defp holds?(term, key) when is_binary(term),
      do:
        Enum.any?(
          [key, Base.encode16(key), Base.encode16(key, case: :lower), Base.encode64(key)],
          &String.contains?(term, &1)
        )

    defp holds?(term, key) when is_list(term), do: holds_list?(term, key)
    defp holds?(term, key) when is_tuple(term), do: holds?(Tuple.to_list(term), key)
    defp holds?(term, key) when is_map(term), do: holds?(Map.to_list(term), key)

    defp holds?(term, key) when is_function(term) do
      {:env, env} = :erlang.fun_info(term, :env)
      holds?(env, key)
    end

    defp holds?(_term, _key), do: false

    defp holds_list?([head | tail], key), do: holds?(head, key) or holds_list?(tail, key)
    defp holds_list?([], _key), do: false
    defp holds_list?(improper_tail, key), do: holds?(improper_tail, key)

    test "rotation rewraps every key; afterwards only the new key opens", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key: @key_a)
      for i <- 1..50, do: {:ok, 1} = Kuma.append(store, "e#{i}", {:n, i})
      assert {:error, {:invalid, :master_key, _}} = Kuma.rotate_master_key(store, "nope")
      assert {:ok, %{keys: 50}} = Kuma.rotate_master_key(store, @key_b)
      # The running store keeps working across the rotation.
      {:ok, 2} = Kuma.append(store, "e1", :after)
      {:ok, 1} = Kuma.append(store, "new", :after)
      :ok = Kuma.stop(store)

      assert {:error, :wrong_master_key} = Kuma.start(name: name, data_dir: dir, master_key: @key_a)
      {:ok, store} = Kuma.start(name: name, data_dir: dir, master_key: @key_b)
      for i <- 2..50, do: assert({:ok, [%{data: {:n, ^i}}]} = Kuma.events(store, "e#{i}"))
      assert {:ok, [_, %{data: :after}]} = Kuma.events(store, "e1")
    end
  end

  describe "encryption switch" do
    test "is recorded in the data dir and cannot change", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, encryption: false)
      {:ok, 1} = Kuma.append(store, "alice", {:plain, "PLAINTEXT-MARK"})

      assert {:error, {:invalid, :sensitive, _}} = Kuma.append(store, "bob", {:x, Kuma.sensitive("alice", "secret")})

      assert {:error, {:invalid, :master_key, _}} = Kuma.rotate_master_key(store, @key_b)
      :ok = Kuma.stop(store)
      assert Enum.any?(contents(dir), fn {_, bytes} -> bytes =~ "PLAINTEXT-MARK" end)
      refute File.exists?(Path.join(dir, "keystore.kuma"))

      assert {:error, {:encryption_mismatch, :store_is_plain}} = Kuma.start(name: name, data_dir: dir)
      enc_dir = dir <> "-enc"
      on_exit(fn -> File.rm_rf!(enc_dir) end)
      {:ok, store} = Kuma.start(name: name, data_dir: enc_dir)
      {:ok, 1} = Kuma.append(store, "alice", {:sealed, "PLAINTEXT-MARK"})
      :ok = Kuma.stop(store)
      refute Enum.any?(contents(enc_dir), fn {_, bytes} -> bytes =~ "PLAINTEXT-MARK" end)

      assert {:error, {:encryption_mismatch, :store_is_encrypted}} =
               Kuma.start(name: name, data_dir: enc_dir, encryption: false)
    end

    test "a missing keystore is an error, never a fresh empty one", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir)
      {:ok, 1} = Kuma.append(store, "alice", :opened)
      :ok = Kuma.stop(store)
      File.rm!(Path.join(dir, "keystore.kuma"))
      assert {:error, {:missing_keystore, path}} = Kuma.start(name: name, data_dir: dir)
      assert path =~ "keystore.kuma"
    end

    test "a key missing from a restored keystore is an error, not an erasure", %{dir: dir, name: name} do
      keystore = Path.join(dir, "keystore.kuma")
      older = dir <> "-older-keystore"
      on_exit(fn -> File.rm(older) end)
      {:ok, store} = Kuma.start(name: name, data_dir: dir)
      {:ok, 1} = Kuma.append(store, "alice", :opened)
      :ok = Kuma.stop(store)
      File.cp!(keystore, older)
      {:ok, store} = Kuma.start(name: name, data_dir: dir)
      {:ok, 1} = Kuma.append(store, "bob", :opened)
      :ok = Kuma.stop(store)
      File.cp!(older, keystore)

      {:ok, store} = Kuma.start(name: name, data_dir: dir)
      assert {:error, :key_missing} = Kuma.events(store, "bob")
      assert {:error, :key_missing} = Kuma.append(store, "bob", :again)
      assert {:ok, false} = Kuma.erased?(store, "bob")
      assert Kuma.format_error(:key_missing) =~ "never erased"
      assert {:ok, [_]} = Kuma.events(store, "alice")
    end
  end

  describe "sensitive values" do
    setup %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Bank.Payments], snapshot_every: 2)
      %{store: store}
    end

    test "erasing the subject leaves a placeholder in the other stream, which stays intact",
         %{store: store, dir: dir} do
      card = "4111111111111111"
      {:ok, 1} = Kuma.append(store, "alice", {:opened, %{name: "Alice Liddell"}})

      {:ok, 1} =
        Kuma.append(store, "bob", {:charged, %{card: Kuma.sensitive("alice", card, placeholder: "**** 1111")}},
          metadata: %{note: Kuma.sensitive("alice", "quoted alice@example.com")}
        )

      {:ok, 2} = Kuma.append(store, "bob", {:charged, %{card: Kuma.sensitive("carol", "5500000000000004")}})
      {:ok, [one, two]} = Kuma.events(store, "bob")
      assert Kuma.Sensitive.value(one.data |> elem(1) |> Map.get(:card)) == card
      assert Kuma.Sensitive.value(one.metadata.note) == "quoted alice@example.com"
      refute inspect(one.data) =~ card
      {:ok, %{hash: hash_before}} = Kuma.verify(store, "bob")

      {:ok, _} = Kuma.delete(store, "alice")

      {:ok, [one, ^two]} = Kuma.events(store, "bob")
      card_value = one.data |> elem(1) |> Map.get(:card)
      assert Kuma.Sensitive.erased?(card_value)
      assert Kuma.Sensitive.value(card_value) == "**** 1111"
      assert Kuma.Sensitive.value(one.metadata.note) == :erased
      assert Kuma.Sensitive.value(two.data |> elem(1) |> Map.get(:card)) == "5500000000000004"
      assert {:ok, %{events: 2, hash: ^hash_before}} = Kuma.verify(store, "bob")
      assert {:ok, %{events: [_, _]}} = Kuma.export(store, "bob")
      assert {:error, {:subject_erased, "alice"}} = Kuma.append(store, "bob", {:x, Kuma.sensitive("alice", 1)})

      :ok = Kuma.flush(store)
      for {file, bytes} <- contents(dir), do: refute(bytes =~ card, "#{file} holds the card number")
    end

    test "live entities and snapshots never keep a decrypted copy that outlives the key", %{store: store} do
      payments = Kuma.entity(store, Bank.Payments, "bob")
      {:ok, 1} = Kuma.execute(payments, {:pay, "alice", "Alice Liddell", 5})
      {:ok, 2} = Kuma.execute(payments, {:pay, "carol", "Carol Danvers", 7})
      assert Bank.Payments.names(Kuma.read(payments)) == ["Carol Danvers", "Alice Liddell"]

      # The snapshot at seq 2 holds sealed bytes, not names.
      {:ok, [%{seq: 2, data: data}]} = wait_for_snapshot(store, "bob")
      refute data =~ "Alice Liddell"
      refute data =~ "Carol Danvers"

      {:ok, _} = Kuma.delete(store, "alice")
      # The live entity was stopped; its reload (from the snapshot) shows the placeholder.
      assert Bank.Payments.names(Kuma.read(payments)) == ["Carol Danvers", "[erased]"]
      assert {:ok, %{replayed_on_load: 0, snapshot_seq: 2}} = Kuma.entity_info(payments)
      assert {:ok, 3} = Kuma.execute(payments, {:pay, "carol", "Carol Danvers", 1})
      assert Kuma.read(payments).total == 13
    end

    test "redact keeps only the sealed bytes; reveal opens them with the key as it is now", %{store: store} do
      {:ok, 1} = Kuma.append(store, "alice", {:opened, %{}})
      {:ok, 1} = Kuma.append(store, "bob", {:paid, %{to: Kuma.sensitive("alice", "Alice Liddell", placeholder: "A.")}})
      {:ok, [%{data: {:paid, paid}}]} = Kuma.events(store, "bob")
      kept = Kuma.Sensitive.redact(paid)
      refute :erlang.term_to_binary(kept) =~ "Alice Liddell"
      assert Kuma.Sensitive.value(kept.to) == nil
      assert Kuma.Sensitive.value(Kuma.Sensitive.reveal(store, kept).to) == "Alice Liddell"
      {:ok, _} = Kuma.delete(store, "alice")
      opened = Kuma.Sensitive.reveal(store.name, kept)
      assert Kuma.Sensitive.erased?(opened.to)
      assert Kuma.Sensitive.value(opened.to) == "A."
    end

    test "bad sensitive values are refused", %{store: store} do
      assert_raise ArgumentError, fn -> Kuma.sensitive("", "x") end
      assert_raise ArgumentError, fn -> Kuma.sensitive(:alice, "x") end
      assert_raise ArgumentError, fn -> Kuma.sensitive("alice", "x", bogus: 1) end

      forged = %Kuma.Sensitive{subject: 42, value: "x"}
      assert {:error, {:invalid, :sensitive, _}} = Kuma.append(store, "bob", {:x, forged})
      assert {:ok, nil} = Kuma.head(store, "bob")
    end

    defp wait_for_snapshot(store, id, tries \\ 50) do
      case Kuma.Native.read_snapshots(store.native, id) do
        {:ok, []} when tries > 0 ->
          Process.sleep(10)
          wait_for_snapshot(store, id, tries - 1)

        other ->
          other
      end
    end
  end

  describe "export" do
    setup %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, aggregates: [Bank.Account], snapshot_every: 100)
      %{store: store}
    end

    test "every event and snapshot, in order, and JSON that Python parses", %{store: store, dir: dir} do
      account = Kuma.entity(store, Bank.Account, "acct-é")

      for i <- 1..250 do
        {:ok, ^i} = Kuma.execute(account, {:deposit, i}, metadata: %{request: "r-#{i}", at: ~U[2026-11-22 10:00:00Z]})
      end

      # An event the aggregate cannot apply, written behind it, to show every JSON form.
      :ok = Kuma.passivate(account)
      {:ok, 251} = Kuma.append(store, "acct-é", [{:odd, {1, 2.5}, <<255, 0>>, [1 | 2], %{{:k} => :v}}])
      :ok = Kuma.flush(store)
      {:ok, events} = Kuma.events(store, "acct-é")

      assert {:ok, export} = Kuma.export(account)
      assert export.format == "kuma-export-v1"
      assert export.verified
      assert export.head.seq == 251
      assert Enum.map(export.events, & &1.seq) == Enum.to_list(1..251)
      assert Enum.map(export.events, & &1.data) == Enum.map(events, & &1.data)
      assert Enum.map(export.events, & &1.hash) == Enum.map(events, & &1.hash)
      assert hd(export.events).metadata == %{request: "r-1", at: ~U[2026-11-22 10:00:00Z]}
      assert Enum.map(export.snapshots, & &1.seq) == [100, 200]
      assert Enum.at(export.snapshots, 1).state.balance == Enum.sum(1..200)

      assert {:ok, json} = Kuma.export_json(account)
      path = Path.join(dir, "export.json")
      File.write!(path, json)

      script = """
      import json, sys, base64
      doc = json.load(open(sys.argv[1], encoding="utf-8"))
      print(json.dumps({
        "format": doc["format"], "entity_id": doc["entity_id"], "verified": doc["verified"],
        "seqs": [e["seq"] for e in doc["events"]],
        "hashes": [e["hash"] for e in doc["events"]],
        "first": doc["events"][0], "last_data": doc["events"][-1]["data"],
        "etf": [e["data_etf"] for e in doc["events"]],
        "snapshots": [s["seq"] for s in doc["snapshots"]],
        "balance": doc["snapshots"][-1]["state"]["balance"],
      }))
      """

      python = System.find_executable("python3") || flunk("python3 not installed (bin/setup installs it)")
      {out, 0} = System.cmd(python, ["-c", script, path])
      # Parse Python's re-encoding back (Python's output is the independent witness).
      parsed = parse_python_summary(out)

      assert parsed["format"] == "kuma-export-v1"
      assert parsed["entity_id"] == "acct-é"
      assert parsed["verified"] == true
      assert parsed["seqs"] == Enum.to_list(1..251)
      assert parsed["hashes"] == Enum.map(events, &Base.encode16(&1.hash, case: :lower))
      assert parsed["snapshots"] == [100, 200]
      assert parsed["balance"] == Enum.sum(1..200)
      assert parsed["first"]["type"] == "Bank.Account.Deposited"
      assert parsed["first"]["data"] == %{"$struct" => "Bank.Account.Deposited", "amount" => 1}
      assert parsed["first"]["metadata"] == %{"request" => "r-1", "at" => "2026-11-22T10:00:00Z"}
      assert {:ok, _, _} = DateTime.from_iso8601(parsed["first"]["timestamp"])

      assert parsed["last_data"] == %{
               "$tuple" => [
                 "odd",
                 %{"$tuple" => [1, 2.5]},
                 %{"$binary" => Base.encode64(<<255, 0>>)},
                 %{"$improper_list" => [1], "tail" => 2},
                 %{"$map" => [[%{"$tuple" => ["k"]}, "v"]]}
               ]
             }

      # data_etf round-trips every event exactly.
      assert Enum.map(parsed["etf"], &:erlang.binary_to_term(Base.decode64!(&1))) == Enum.map(events, & &1.data)
    end

    test "exports through an entity handle are upcast like every read", %{store: store} do
      # {:credited, n} is the old shape of Bank.Account.Deposited (Bank.Account.upcast/2).
      {:ok, 1} = Kuma.append(store, "acct-old", {:credited, 7})
      account = Kuma.entity(store, Bank.Account, "acct-old")
      assert {:ok, %{events: [%{data: %Bank.Account.Deposited{amount: 7}}]}} = Kuma.export(account)
      assert {:ok, %{events: [%{data: {:credited, 7}}]}} = Kuma.export(store, "acct-old")
      {:ok, json} = Kuma.export_json(account)
      assert json =~ ~s("data":{"$struct":"Bank.Account.Deposited","amount":7})
    end

    test "an unknown entity exports empty; bad input is refused", %{store: store} do
      assert {:ok, %{events: [], snapshots: [], head: nil}} = Kuma.export(store, "nobody")
      assert {:error, {:invalid, :entity_id, _}} = Kuma.export(store, "")
    end
  end

  # Python prints JSON; Kuma has an encoder but no decoder, so read it with a tiny parser.
  defp parse_python_summary(text), do: text |> String.trim() |> Kuma.JSONTestParser.parse!()
end
