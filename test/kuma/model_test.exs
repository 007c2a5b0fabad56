defmodule Kuma.ModelTest do
  # Model-based test of the append/read/erase API: random sequences of operations run
  # against a real store and against a model (a map of id => list of events, and a set of
  # erased ids), and every answer must be the one the model predicts. A failing sequence is
  # shrunk (operations removed while it still fails) and printed with its seed.
  #
  # A small generator of our own (hex.pm is out of reach, so no StreamData): seeded, so a
  # failure reruns exactly. CI runs a fixed seed; for a longer run:
  #
  #     KUMA_MODEL_RUNS=500 KUMA_MODEL_OPS=150 KUMA_MODEL_SEED=$RANDOM mix test test/kuma/model_test.exs
  #
  # (docs/testing.md). Each operation is chosen without looking at the model; what depends
  # on the model (the right expected_seq, a wrong one) is resolved when it runs, so any
  # subsequence of a sequence is a valid sequence, which is what shrinking needs.
  use ExUnit.Case, async: false

  # Long runs (KUMA_MODEL_RUNS) take as long as they take.
  @moduletag timeout: :infinity

  @ids ["a", "b", "c", "d", "e", "f", <<0, 255, 1>>, String.duplicate("z", 512)]

  defp env_int(name, default) do
    case System.get_env(name) do
      nil -> default
      value -> String.to_integer(value)
    end
  end

  test "random sequences of appends, reads, erasures and restarts agree with the model" do
    seed = env_int("KUMA_MODEL_SEED", 20_261_201)
    runs = env_int("KUMA_MODEL_RUNS", 40)
    ops = env_int("KUMA_MODEL_OPS", 80)

    for run <- 1..runs do
      sequence = generate({seed, run}, ops)
      # Odd runs use a plain store, even runs an encrypted one.
      encrypted = rem(run, 2) == 0

      case execute(sequence, encrypted) do
        :ok ->
          :ok

        {:failed, step, detail} ->
          {minimal, {mstep, mdetail}} = shrink(sequence, encrypted, {step, detail})

          flunk("""
          model test failed: KUMA_MODEL_SEED=#{seed} run #{run} (encrypted: #{encrypted}), step #{step}: #{detail}
          shrunk to #{length(minimal)} operations, failing at step #{mstep}: #{mdetail}
          #{Enum.map_join(Enum.with_index(minimal, 1), "\n", fn {op, i} -> "  #{i}. #{inspect(op, limit: 8)}" end)}
          """)
      end
    end
  end

  # -- generation ------------------------------------------------------------------------

  defp generate(seed, count) do
    {a, b} = seed
    :rand.seed(:exsss, {a, b, 7})
    for _ <- 1..count, do: op()
  end

  @weights [
    append: 30,
    append_entity: 10,
    batch: 8,
    events: 16,
    head: 6,
    state: 6,
    delete: 4,
    verify: 4,
    bad_input: 4,
    passivate: 3,
    kill_entity: 3,
    concurrent: 5,
    restart: 2
  ]

  defp op do
    case pick(@weights) do
      :append -> {:append, id(), :rand.uniform(3), expected()}
      :append_entity -> {:append_entity, id(), :rand.uniform(2)}
      :batch -> {:batch, for(_ <- 1..:rand.uniform(4), do: {id(), :rand.uniform(2)})}
      :events -> {:events, id(), :rand.uniform(8), Enum.random([nil, 1, 2, 5])}
      :head -> {:head, id()}
      :state -> {:state, id()}
      :delete -> {:delete, id()}
      :verify -> {:verify, id()}
      :bad_input -> {:bad_input, id(), Enum.random([:timeout, :expected_seq, :empty, :from])}
      :passivate -> {:passivate, id()}
      :kill_entity -> {:kill_entity, id()}
      :concurrent -> {:concurrent, for(id <- Enum.take_random(@ids, 2 + :rand.uniform(3)), do: {id, :rand.uniform(3)})}
      :restart -> :restart
    end
  end

  defp pick(weights) do
    n = :rand.uniform(Enum.sum(Keyword.values(weights)))

    Enum.reduce_while(weights, n, fn {what, w}, left ->
      if left <= w, do: {:halt, what}, else: {:cont, left - w}
    end)
  end

  defp id, do: Enum.random(@ids)
  defp expected, do: Enum.random([:none, :none, :right, :right, :wrong_above, :wrong_below])

  # -- execution -------------------------------------------------------------------------

  defmodule Model do
    @moduledoc false
    defstruct events: %{}, erased: MapSet.new(), next: 0

    def seq(m, id), do: length(Map.get(m.events, id, []))
    def erased?(m, id), do: MapSet.member?(m.erased, id)

    # Fresh event data, unique in the run (so a wrong or repeated event shows).
    def fresh(m, n), do: {for(i <- 1..n, do: {:e, m.next + i}), %{m | next: m.next + n}}

    def add(m, id, data), do: %{m | events: Map.update(m.events, id, data, &(&1 ++ data))}
    def erase(m, id), do: %{m | events: Map.delete(m.events, id), erased: MapSet.put(m.erased, id)}
  end

  defp execute(sequence, encrypted) do
    dir = Path.join(System.tmp_dir!(), "kuma_model_#{System.pid()}_#{System.unique_integer([:positive])}")
    name = :"kuma_model_#{System.unique_integer([:positive])}"
    opts = [name: name, data_dir: dir, shards: 3, snapshot_every: 3, encryption: encrypted]
    {:ok, store} = Kuma.start(opts)

    try do
      result =
        sequence
        |> Enum.with_index(1)
        |> Enum.reduce_while({store, %Model{}}, fn {op, step}, {store, model} ->
          case run(op, store, model, opts) do
            {:ok, store, model} -> {:cont, {store, model}}
            {:failed, detail} -> {:halt, {:failed, step, detail}}
          end
        end)

      case result do
        {:failed, _, _} = failed -> failed
        {store, model} -> final_check(store, model, length(sequence) + 1)
      end
    rescue
      e -> {:failed, :raise, Exception.format(:error, e, __STACKTRACE__)}
    after
      Kuma.stop(name)
      File.rm_rf!(dir)
    end
  end

  # Each clause: what the store answers, what the model says it must be.
  defp run({:append, id, n, expected}, store, model, _opts) do
    {data, model} = Model.fresh(model, n)
    seq = Model.seq(model, id)

    {opts, predicted_ok} =
      case expected do
        :none -> {[], true}
        :right -> {[expected_seq: seq], true}
        :wrong_above -> {[expected_seq: seq + 1], false}
        :wrong_below when seq > 0 -> {[expected_seq: seq - 1], false}
        :wrong_below -> {[expected_seq: seq + 2], false}
      end

    answer = Kuma.append(store, id, data, opts)

    cond do
      Model.erased?(model, id) ->
        expect(answer, {:error, :entity_erased}, store, model)

      predicted_ok ->
        expect(answer, {:ok, seq + n}, store, Model.add(model, id, data))

      true ->
        expect(answer, {:error, {:wrong_expected_seq, opts[:expected_seq], seq}}, store, model)
    end
  end

  defp run({:append_entity, id, n}, store, model, _opts) do
    {data, model} = Model.fresh(model, n)
    answer = store |> Kuma.entity(id) |> Kuma.append(data)

    if Model.erased?(model, id),
      do: expect(answer, {:error, :entity_erased}, store, model),
      else: expect(answer, {:ok, Model.seq(model, id) + n}, store, Model.add(model, id, data))
  end

  defp run({:batch, entries}, store, model, _opts) do
    {entries, outcomes, model} =
      Enum.reduce(entries, {[], [], model}, fn {id, n}, {entries, outcomes, model} ->
        {data, model} = Model.fresh(model, n)

        if Model.erased?(model, id),
          do: {[{id, data} | entries], [{:error, :entity_erased} | outcomes], model},
          else: {[{id, data} | entries], [{:ok, Model.seq(model, id) + n} | outcomes], Model.add(model, id, data)}
      end)

    {entries, outcomes} = {Enum.reverse(entries), Enum.reverse(outcomes)}

    predicted =
      if Enum.all?(outcomes, &match?({:ok, _}, &1)),
        do: {:ok, Enum.map(outcomes, &elem(&1, 1))},
        else: {:error, {:partial, outcomes}}

    expect(Kuma.append_batch(store, entries), predicted, store, model)
  end

  defp run({:events, id, from, limit}, store, model, _opts) do
    opts = if limit, do: [from: from, limit: limit], else: [from: from]

    if Model.erased?(model, id) do
      expect(Kuma.events(store, id, opts), {:error, :entity_erased}, store, model)
    else
      all = Map.get(model.events, id, [])
      wanted = all |> Enum.drop(from - 1) |> Enum.take(limit || length(all))
      seqs = Enum.to_list(from..(from + length(wanted) - 1)//1)

      case Kuma.events(store, id, opts) do
        {:ok, events} ->
          expect({Enum.map(events, & &1.seq), Enum.map(events, & &1.data)}, {seqs, wanted}, store, model)

        other ->
          {:failed, "events(#{inspect(id, limit: 4)}, #{inspect(opts)}) answered #{inspect(other)}"}
      end
    end
  end

  defp run({:head, id}, store, model, _opts) do
    cond do
      Model.erased?(model, id) ->
        expect(Kuma.head(store, id), {:error, :entity_erased}, store, model)

      Model.seq(model, id) == 0 ->
        expect(Kuma.head(store, id), {:ok, nil}, store, model)

      true ->
        case Kuma.head(store, id) do
          {:ok, %{seq: seq}} -> expect(seq, Model.seq(model, id), store, model)
          other -> {:failed, "head answered #{inspect(other)}"}
        end
    end
  end

  # The latest event is the state of a Kuma.Aggregate.Latest entity.
  defp run({:state, id}, store, model, _opts) do
    answer = store |> Kuma.entity(id) |> Kuma.fetch()

    cond do
      Model.erased?(model, id) -> expect(answer, {:error, :entity_erased}, store, model)
      true -> expect(answer, {:ok, List.last(Map.get(model.events, id, [nil]))}, store, model)
    end
  end

  defp run({:delete, id}, store, model, _opts) do
    expect(Kuma.delete(store, id), {:ok, %{events_deleted: Model.seq(model, id)}}, store, Model.erase(model, id))
  end

  defp run({:verify, id}, store, model, _opts) do
    case Kuma.verify(store, id) do
      {:ok, %{events: n}} -> expect(n, Model.seq(model, id), store, model)
      other -> {:failed, "verify answered #{inspect(other)}"}
    end
  end

  # Bad input is refused and changes nothing (the next read would show it otherwise).
  defp run({:bad_input, id, kind}, store, model, _opts) do
    answer =
      case kind do
        :timeout -> Kuma.append(store, id, {:e, -1}, timeout: -1)
        :expected_seq -> Kuma.append(store, id, {:e, -1}, expected_seq: -3)
        :empty -> Kuma.append(store, id, [])
        :from -> Kuma.events(store, id, from: -1)
      end

    case answer do
      {:error, {:invalid, _, _}} -> {:ok, store, model}
      other -> {:failed, "bad input #{kind} answered #{inspect(other)}"}
    end
  end

  defp run({:passivate, id}, store, model, _opts) do
    _ = store |> Kuma.entity(id) |> Kuma.Entity.passivate()
    {:ok, store, model}
  end

  # A live entity killed (not stopped): the next operations find the store as it was.
  defp run({:kill_entity, id}, store, model, _opts) do
    case Kuma.Entity.whereis(store, id) do
      nil ->
        :ok

      pid ->
        ref = Process.monitor(pid)
        Process.exit(pid, :kill)
        receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
    end

    {:ok, store, model}
  end

  # Appends to distinct entities at the same time, half through entity processes: each
  # answer is the one it would get alone.
  defp run({:concurrent, writes}, store, model, _opts) do
    {planned, model} =
      Enum.map_reduce(Enum.with_index(writes), model, fn {{id, n}, i}, model ->
        {data, model} = Model.fresh(model, n)
        {{id, data, i}, model}
      end)

    answers =
      planned
      |> Enum.map(fn {id, data, i} ->
        Task.async(fn ->
          if rem(i, 2) == 0,
            do: Kuma.append(store, id, data),
            else: store |> Kuma.entity(id) |> Kuma.append(data)
        end)
      end)
      |> Task.await_many(10_000)

    Enum.zip(planned, answers)
    |> Enum.reduce_while({:ok, store, model}, fn {{id, data, _}, answer}, {:ok, store, model} ->
      result =
        if Model.erased?(model, id),
          do: expect(answer, {:error, :entity_erased}, store, model),
          else: expect(answer, {:ok, Model.seq(model, id) + length(data)}, store, Model.add(model, id, data))

      case result do
        {:ok, _, _} = ok -> {:cont, ok}
        failed -> {:halt, failed}
      end
    end)
  end

  defp run(:restart, store, model, opts) do
    :ok = Kuma.stop(store)
    {:ok, store} = Kuma.start(opts)
    {:ok, store, model}
  end

  defp expect(answer, answer, store, model), do: {:ok, store, model}

  defp expect(answer, predicted, _store, _model),
    do: {:failed, "answered #{inspect(answer, limit: 12)}, the model says #{inspect(predicted, limit: 12)}"}

  # After the sequence: every entity reads back exactly as the model has it, every erased
  # one is erased, and the whole store verifies.
  defp final_check(store, model, step) do
    mismatch =
      Enum.find_value(@ids, fn id ->
        cond do
          Model.erased?(model, id) ->
            if Kuma.events(store, id) != {:error, :entity_erased}, do: "#{inspect(id)} is not erased"

          true ->
            want = Map.get(model.events, id, [])

            case Kuma.events(store, id) do
              {:ok, events} ->
                if Enum.map(events, & &1.data) != want, do: "#{inspect(id, limit: 4)} reads other events at the end"

              other ->
                "#{inspect(id, limit: 4)} answered #{inspect(other)} at the end"
            end
        end
      end)

    total = model.events |> Map.values() |> Enum.map(&length/1) |> Enum.sum()

    cond do
      mismatch ->
        {:failed, step, mismatch}

      not match?({:ok, %{events: ^total}}, Kuma.verify_store(store)) ->
        {:failed, step, "verify_store answered #{inspect(Kuma.verify_store(store))}, #{total} events expected"}

      true ->
        :ok
    end
  end

  # -- shrinking -------------------------------------------------------------------------

  # Removes chunks of operations, then single ones, while the sequence still fails; at most
  # 300 reruns.
  defp shrink(sequence, encrypted, failure), do: shrink(sequence, encrypted, failure, div(length(sequence), 2), 300)

  defp shrink(sequence, _encrypted, failure, _chunk, budget) when budget <= 0, do: {sequence, failure}

  defp shrink(sequence, encrypted, failure, chunk, budget) do
    chunk = max(chunk, 1)

    attempt =
      0..(length(sequence) - 1)//chunk
      |> Enum.reduce_while(budget, fn start, budget ->
        candidate = Enum.take(sequence, start) ++ Enum.drop(sequence, start + chunk)

        cond do
          budget <= 0 ->
            {:halt, {:exhausted}}

          candidate == [] ->
            {:cont, budget - 1}

          true ->
            case execute(candidate, encrypted) do
              {:failed, step, detail} -> {:halt, {:smaller, candidate, {step, detail}, budget - 1}}
              :ok -> {:cont, budget - 1}
            end
        end
      end)

    case attempt do
      {:smaller, candidate, failure, budget} -> shrink(candidate, encrypted, failure, chunk, budget)
      {:exhausted} -> {sequence, failure}
      _budget when chunk == 1 -> {sequence, failure}
      budget -> shrink(sequence, encrypted, failure, div(chunk, 2), budget)
    end
  end
end
