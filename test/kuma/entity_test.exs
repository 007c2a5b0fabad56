defmodule Kuma.EntityTest do
  use Kuma.StoreCase, async: true

  alias Bank.Account
  alias Bank.Account.{Deposited, Withdrawn}

  @moduletag store_opts: [aggregates: [Bank.Account, Bank.Ledger, Bank.AccountV2], snapshot_every: 10]

  defp account(store, id \\ "account:alice"), do: Kuma.entity(store, Account, id)

  describe "commands and reads" do
    test "execute decides, appends and evolves; read is from memory", %{store: store} do
      alice = account(store)
      assert {:ok, 1} = Kuma.append(alice, %Deposited{amount: 50})
      assert {:ok, 2} = Kuma.execute(alice, {:withdraw, 20})
      assert %Account{balance: 30, version: 2} = Kuma.read(alice)
      assert {:ok, %Account{balance: 30}} = Kuma.fetch(alice)
      assert {:error, :insufficient_funds} = Kuma.execute(alice, {:withdraw, 1_000})
      assert {:ok, 2} = Kuma.execute(alice, :noop)
      assert seqs(store, "account:alice") == [1, 2]
      assert {:ok, [%{data: %Deposited{amount: 50}}, %{data: %Withdrawn{amount: 20}}]} = Kuma.history(alice)
    end

    test "a read of a live entity calls neither the entity nor a NIF", %{store: store} do
      alice = account(store)
      {:ok, _} = Kuma.execute(alice, {:deposit, 10})
      {:ok, %{live: true, pid: pid}} = Kuma.entity_info(alice)
      # The entity cannot answer messages while suspended...
      :sys.suspend(pid)
      # ...and every call into Kuma.Native made by this process is traced.
      :erlang.trace(self(), true, [:call])
      :erlang.trace_pattern({Kuma.Native, :_, :_}, true, [:local])
      assert %Account{balance: 10} = Kuma.read(alice)
      :erlang.trace(self(), false, [:call])
      :erlang.trace_pattern({Kuma.Native, :_, :_}, false, [:local])
      :sys.resume(pid)
      refute_received {:trace, _, :call, {Kuma.Native, _, _}}
    end

    test "1,000 concurrent commands on one account: exact balance, gapless verified chain", %{store: store} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 100_000})

      results =
        1..1_000
        |> Task.async_stream(
          fn i ->
            if rem(i, 4) == 0, do: Kuma.execute(alice, {:withdraw, 7}), else: Kuma.execute(alice, {:deposit, 3})
          end,
          max_concurrency: 1_000,
          timeout: 60_000
        )
        |> Enum.map(fn {:ok, r} -> r end)

      assert Enum.all?(results, &match?({:ok, _}, &1))
      seqs_acked = Enum.map(results, fn {:ok, seq} -> seq end)
      assert Enum.sort(seqs_acked) == Enum.to_list(2..1_001)
      assert %Account{balance: balance} = Kuma.read(alice)
      assert balance == 100_000 + 750 * 3 - 250 * 7
      assert seqs(store, "account:alice") == Enum.to_list(1..1_001)
      assert {:ok, %{events: 1_001}} = Kuma.verify(store, "account:alice")
    end

    test "entities of several aggregates live in one store", %{store: store} do
      {:ok, 1} = Kuma.execute(account(store, "account:bob"), {:deposit, 5})
      ledger = Kuma.entity(store, Bank.Ledger, "ledger:1")
      {:ok, 3} = Kuma.append(ledger, [:a, :b, :c])
      assert Kuma.read(ledger) == 3
      plain = Kuma.entity(store, "sensor:7")
      {:ok, 2} = Kuma.append(plain, [%{temp: 20}, %{temp: 21}])
      assert Kuma.read(plain) == %{temp: 21}
      assert Kuma.read(Kuma.entity(store, "sensor:never")) == nil
    end
  end

  describe "bad input changes nothing" do
    test "unknown aggregate, no handle/2, stale expected_seq, mismatched aggregate", %{store: store} do
      assert {:error, {:unknown_aggregate, URI}} = Kuma.execute(Kuma.entity(store, URI, "x"), :cmd)
      assert {:error, {:unknown_aggregate, URI}} = Kuma.fetch(Kuma.entity(store, URI, "x"))
      ledger = Kuma.entity(store, Bank.Ledger, "ledger:2")
      assert {:error, {:no_handle, Bank.Ledger}} = Kuma.execute(ledger, :anything)
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 1})
      assert {:error, {:wrong_expected_seq, 0, 1}} = Kuma.execute(alice, {:deposit, 1}, expected_seq: 0)
      assert {:error, {:wrong_expected_seq, 5, 1}} = Kuma.append(alice, %Deposited{amount: 1}, expected_seq: 5)
      assert {:ok, 2} = Kuma.execute(alice, {:deposit, 1}, expected_seq: 1)
      assert {:error, {:aggregate_mismatch, Account}} = Kuma.fetch(Kuma.entity(store, Bank.Ledger, "account:alice"))

      assert {:error, {:aggregate_mismatch, Account}} =
               Kuma.execute(Kuma.entity(store, Bank.AccountV2, "account:alice"), :noop)

      assert {:error, {:invalid, :events, _}} = Kuma.append(alice, [])
      assert {:error, {:unknown_option, :expect}} = Kuma.execute(alice, :noop, expect: 1)
      assert_raise ArgumentError, fn -> Kuma.entity(store, Account, "") end
      assert_raise ArgumentError, fn -> Kuma.entity(store, Account, :alice) end
      assert seqs(store, "account:alice") == [1, 2]
    end

    test "a raising handle or apply writes nothing; the next call reloads", %{store: store} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 10})
      assert {:error, {:user_code_crashed, :apply, message}} = Kuma.execute(alice, :poison)
      assert message =~ "ArithmeticError"
      assert {:error, {:user_code_crashed, :handle, _}} = Kuma.execute(alice, :crash)
      assert seqs(store, "account:alice") == [1]
      assert %Account{balance: 10} = Kuma.read(alice)
      assert {:ok, 2} = Kuma.execute(alice, {:deposit, 5})
      assert %Account{balance: 15} = Kuma.read(alice)
    end

    test "an event that fails to replay is reported with its seq", %{store: store} do
      # Written at store level, bypassing the aggregate: Bank.Account cannot apply it.
      {:ok, 2} = Kuma.append(store, "account:broken", [%Deposited{amount: 1}, {:garbage, 1}])
      assert {:error, {:replay_failed, 2, message}} = Kuma.fetch(account(store, "account:broken"))
      assert message =~ "FunctionClauseError"
      assert_raise Kuma.Error, ~r/replaying event 2 failed/, fn -> Kuma.read(account(store, "account:broken")) end
    end

    test "calls on a stopped store", %{store: store, name: name} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 1})
      :ok = Kuma.stop(store)
      assert {:error, {:no_store, ^name}} = Kuma.execute(alice, {:deposit, 1})
      assert {:error, {:no_store, ^name}} = Kuma.fetch(alice)
      assert {:error, {:no_store, ^name}} = Kuma.read_at(alice, seq: 1)
      assert_raise Kuma.Error, fn -> Kuma.read(alice) end
    end
  end

  describe "single writer" do
    test "store-level appends to a live entity go through it", %{store: store} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 10})
      assert {:ok, 2} = Kuma.append(store, "account:alice", %Deposited{amount: 5})
      assert %Account{balance: 15} = Kuma.read(alice)
      assert {:ok, [3, 1]} = Kuma.append_batch(store, [{"account:alice", %Withdrawn{amount: 4}}, {"account:cold", :x}])
      assert %Account{balance: 11, version: 3} = Kuma.read(alice)
      # An event the aggregate cannot fold is refused by the live entity, and not written.
      assert {:error, {:user_code_crashed, :apply, _}} = Kuma.append(store, "account:alice", {:garbage, 1})
      assert seqs(store, "account:alice") == [1, 2, 3]
    end

    test "a write that bypassed a live entity is detected and the command retried", %{store: store} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 10})
      # Write behind the entity's back (what a store-level write racing activation does).
      {:ok, s} = Kuma.Store.lookup(store)
      {:ok, _} = Kuma.EventLog.append(s, "account:alice", [%Deposited{amount: 100}], expected_seq: 1)
      # Decided against the stale state (balance 10), the write meets seq 2 instead of 1:
      # the entity reloads (balance 110) and decides again.
      assert {:ok, 3} = Kuma.execute(alice, {:withdraw, 5})
      assert %Account{balance: 105} = Kuma.read(alice)
      assert seqs(store, "account:alice") == [1, 2, 3]
    end
  end

  describe "persistence, snapshots and time travel" do
    test "a restart gives the same state", %{store: store, dir: dir, name: name} do
      alice = account(store)
      for i <- 1..25, do: {:ok, _} = Kuma.execute(alice, {:deposit, i})
      before = Kuma.read(alice)
      :ok = Kuma.stop(store)
      {:ok, _} = Kuma.start(name: name, data_dir: dir, shards: 4, aggregates: [Account], snapshot_every: 10)
      assert Kuma.read(Kuma.entity(name, Account, "account:alice")) == before
      assert before.balance == Enum.sum(1..25)
    end

    test "a cold load starts from the latest snapshot", %{store: store} do
      alice = account(store)
      for _ <- 1..47, do: {:ok, _} = Kuma.execute(alice, {:deposit, 2})
      :ok = Kuma.flush(store)
      :ok = Kuma.passivate(alice)
      assert {:ok, %{live: false}} = Kuma.entity_info(alice)
      assert %Account{balance: 94, version: 47} = Kuma.read(alice)
      assert {:ok, %{live: true, seq: 47, snapshot_seq: 40, replayed_on_load: 7}} = Kuma.entity_info(alice)

      # Another snapshot version ignores those snapshots and replays everything.
      :ok = Kuma.passivate(alice)
      v2 = Kuma.entity(store, Bank.AccountV2, "account:alice")
      assert %Account{balance: 94} = Kuma.read(v2)
      assert {:ok, %{snapshot_seq: 0, replayed_on_load: 47}} = Kuma.entity_info(v2)
    end

    test "read_at by seq and by time returns historical states", %{store: store} do
      alice = account(store)
      {:ok, 1} = Kuma.execute(alice, {:deposit, 100})
      {:ok, [%{timestamp: t1}]} = Kuma.history(alice)
      Process.sleep(5)
      for _ <- 1..30, do: {:ok, _} = Kuma.execute(alice, {:withdraw, 1})
      :ok = Kuma.flush(store)
      assert {:ok, %Account{balance: 100}} = Kuma.read_at(alice, seq: 1)
      assert {:ok, %Account{balance: 85}} = Kuma.read_at(alice, seq: 16)
      assert {:ok, %Account{balance: 70}} = Kuma.read_at(alice, seq: 31)
      assert {:ok, %Account{balance: 70}} = Kuma.read_at(alice, seq: 1_000)
      assert {:ok, %Account{balance: 0}} = Kuma.read_at(alice, seq: 0)
      assert {:ok, %Account{balance: 100}} = Kuma.read_at(alice, at: DateTime.from_unix!(t1, :microsecond))
      assert {:ok, %Account{balance: 0}} = Kuma.read_at(alice, at: ~U[2000-01-01 00:00:00Z])
      assert {:ok, %Account{balance: 70}} = Kuma.read_at(alice, at: DateTime.add(DateTime.utc_now(), 60))
      assert {:error, {:invalid, :read_at, _}} = Kuma.read_at(alice, seq: 1, at: ~U[2000-01-01 00:00:00Z])
    end
  end

  describe "schema evolution" do
    @describetag store: false

    test "old event shapes are upcast on load and in history by the aggregate", %{dir: dir, name: name} do
      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Account])
      # Events as an older version of the code wrote them.
      {:ok, 2} = Kuma.append(store, "account:old", [{:credited, 70}, {:credited, 5}])
      old = account(store, "account:old")
      assert %Account{balance: 75} = Kuma.read(old)
      assert {:ok, [%{data: %Deposited{amount: 70}, seq: 1}, %{data: %Deposited{amount: 5}}]} = Kuma.history(old)
      assert {:ok, %Account{balance: 70}} = Kuma.read_at(old, seq: 1)
      # Storage was not rewritten.
      assert [{:credited, 70}, {:credited, 5}] = Kuma.stream(store, "account:old") |> Enum.map(& &1.data)
    end

    test "store-level upcasters apply to every read path", %{dir: dir, name: name} do
      up = fn
        {:v1_reading, value}, _envelope -> %{value: value}
        event, _envelope -> event
      end

      {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, upcasters: [up])
      {:ok, 1} = Kuma.append(store, "sensor:1", {:v1_reading, 7})
      assert [%{data: %{value: 7}}] = Enum.to_list(Kuma.stream(store, "sensor:1"))
      {:ok, shard} = Kuma.shard_for(store, "sensor:1")
      assert {:ok, [%{data: %{value: 7}}]} = Kuma.read_shard(store, shard, 0)
      assert Kuma.read(Kuma.entity(store, "sensor:1")) == %{value: 7}
    end
  end
end
