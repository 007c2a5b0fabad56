defmodule Kuma.GleamTest do
  # Kuma's Gleam bindings. The conversions (Kuma.Gleam) are tested with the Erlang terms
  # Gleam values compile to, with or without a Gleam compiler; the compiled Gleam package
  # (gleam/) and the Gleam bank (examples/gleam_bank/) are called as Gleam code calls them
  # where `gleam` is on PATH (tagged :gleam; skipped with one line otherwise).
  use Kuma.StoreCase, async: true

  @moduletag store: false

  Code.require_file(Path.expand("../../examples/bank/bank.ex", __DIR__))

  describe "Kuma.Gleam, with the terms Gleam compiles to" do
    test "start options are Gleam records; errors are KumaError values", %{dir: dir} do
      # [kuma.DataDir(dir), kuma.Shards(2), kuma.Name("g1"), kuma.Sync(kuma.Full), kuma.Http(0)]
      options = [{:data_dir, dir}, {:shards, 2}, {:name, "gleam_g1"}, {:sync, :full}, {:http, 0}]
      assert {:ok, {:store, :gleam_g1} = store} = Kuma.Gleam.start_with(options)
      assert {:ok, %{shards: 2, sync: :full, http: "http://127.0.0.1:" <> _}} = Kuma.info(:gleam_g1)

      # A second store on the same data dir: AlreadyStarted(name), DataDirLocked(path).
      assert {:error, {:already_started, "gleam_g1"}} = Kuma.Gleam.start_with(options)

      assert {:error, {:data_dir_locked, _}} =
               Kuma.Gleam.start_with(List.keyreplace(options, :name, 0, {:name, "gleam_g2"}))

      assert {:error, {:invalid, "shards", _}} = Kuma.Gleam.start(dir <> "-x", 0)
      assert {:error, {:invalid, "options", _}} = Kuma.Gleam.start_with([:not_an_option])
      assert {:ok, nil} = Kuma.Gleam.stop(store)
      assert {:error, {:no_store, "gleam_g1"}} = Kuma.Gleam.stop(store)
    end

    test "entities: append, read, history, erase", %{dir: dir} do
      {:ok, store} = Kuma.Gleam.start(dir, 2)
      user = Kuma.Gleam.spawn(store, "user_0x9A4F")

      # entity.read on an entity of the latest event with none yet: Error(NoEvents).
      assert {:error, :no_events} = Kuma.Gleam.read(user)
      # UserCreated(name: "Dwighson", role: "architect")
      created = {:user_created, "Dwighson", "architect"}
      assert {:ok, 1} = Kuma.Gleam.append(user, [created])
      assert {:ok, ^created} = Kuma.Gleam.read(user)
      assert {:ok, 3} = Kuma.Gleam.append(user, [{:role_changed, "lead"}, :promoted])

      assert {:ok,
              [
                {:envelope, "user_0x9A4F", 1, _, _, "user_created", ts, ^created},
                {:envelope, _, 2, _, _, "role_changed", _, _},
                {:envelope, _, 3, _, _, "", _, :promoted}
              ]} = Kuma.Gleam.history(user)

      assert is_integer(ts)

      assert {:ok, [{:envelope, "user_0x9A4F", 1, _, _, "user_created", _, ^created}]} =
               Kuma.Gleam.by_type(store, "user_created", 10)

      assert {:ok, 3} = Kuma.Gleam.erase(user)
      assert {:error, :entity_erased} = Kuma.Gleam.append(user, [created])
      assert {:ok, nil} = Kuma.Gleam.stop(store)
    end

    test "execute: the aggregate's refusal is Rejected(reason), Kuma's failure Failed(error)", %{dir: dir} do
      {:ok, store} =
        Kuma.Gleam.start_with([{:data_dir, dir}, {:shards, 1}, {:aggregates, ["Elixir.BankExample.Account"]}])

      acct = Kuma.Gleam.of(store, "Elixir.BankExample.Account", "a")
      assert {:ok, 1} = Kuma.Gleam.execute(acct, {:open, 10, 100})
      assert {:error, {:rejected, :insufficient_funds}} = Kuma.Gleam.execute(acct, {:withdraw, 50})
      assert {:ok, %BankExample.Account{balance: 10}} = Kuma.Gleam.read(acct)

      other = Kuma.Gleam.of(store, "Elixir.Bank.Ledger", "b")
      assert {:error, {:failed, {:other, message}}} = Kuma.Gleam.execute(other, :anything)
      assert message =~ "not an aggregate of this store"
      Kuma.Gleam.stop(store)
    end

    test "a projection calls a function with each Envelope", %{dir: dir} do
      {:ok, store} = Kuma.Gleam.start(dir, 2)
      me = self()
      for i <- 1..5, do: {:ok, _} = Kuma.Gleam.append(Kuma.Gleam.spawn(store, "p#{i}"), [{:n, i}])
      assert {:ok, nil} = Kuma.Gleam.start_projection(store, "gleam_fun_projection", &send(me, &1))
      for i <- 1..5, do: assert_receive({:envelope, "p" <> _, 1, _, _, "n", _, {:n, ^i}})
      assert eventually(fn -> Kuma.Gleam.projection_lag("gleam_fun_projection") == {:ok, 0} end)
      assert {:ok, nil} = Kuma.Gleam.stop_projection("gleam_fun_projection")
      assert {:error, {:other, _}} = Kuma.Gleam.projection_lag("gleam_fun_projection")
      Kuma.Gleam.stop(store)
    end
  end

  # Gleam modules are called through apply/3: without a Gleam compiler they do not exist,
  # and the calls must not warn at compile time.
  defp g(module, function, args), do: apply(module, function, args)

  describe "the compiled Gleam package" do
    @describetag :gleam

    test "kuma, kuma/entity and kuma/query as Gleam calls them", %{dir: dir} do
      assert {:ok, store} = g(:kuma, :start, [dir, 4])
      user = g(:kuma@entity, :spawn, [store, "user_0x9A4F"])
      assert {:ok, 1} = g(:kuma@entity, :append, [user, {:user_created, "Dwighson", "architect"}])
      assert {:ok, {:user_created, "Dwighson", "architect"}} = g(:kuma@entity, :read, [user])
      assert {:ok, [{:envelope, "user_0x9A4F", 1, _, _, "user_created", _, _}]} = g(:kuma@entity, :history, [user])
      assert {:ok, [_]} = g(:kuma@query, :by_type, [store, "user_created", 5])
      assert {:ok, nil} = g(:kuma, :stop, [store])
    end

    test "the Gleam bank: a Gleam aggregate and the transfer saga in Gleam, against a real store", %{dir: dir} do
      # One transfer completes, one goes over bob's limit and one to a closed account:
      # both refunded, and the total is what alice started with.
      assert {:ok, {:summary, 1, 2, 100}} = g(:gleam_bank, :run, [dir])
      {:ok, _} = Kuma.start(name: :gleam_bank_check, data_dir: dir, shards: 4, aggregates: [:bank@account])
      assert {:ok, {:account, true, 70, 1000}} = Kuma.fetch(Kuma.entity(:gleam_bank_check, :bank@account, "alice"))

      assert {:ok, %Kuma.Saga.Log{status: :compensated, failed: {1, :over_limit}}} =
               Kuma.Saga.status(:gleam_bank_check, "t2")

      Kuma.stop(:gleam_bank_check)
    end
  end
end
