defmodule Kuma.Test.ClusterChecker do
  @moduledoc """
  Checks a recorded history of appends (`Kuma.Test.ClusterWriter`) against what the
  cluster stores, entity by entity:

  * seqs are 1..n, without gaps, and no value is stored twice;
  * every acknowledged append is stored exactly once, at the seq it was acknowledged with;
  * every refused append (`wrong_expected_seq`, erased, invalid) is absent;
  * an append whose outcome is unknown (timeout, lost leader) is stored at most once;
  * nothing is stored that was never attempted;
  * every read a writer made right after an acknowledged append (`{:read, id, acked_seq,
    seen}`) saw at least that seq: reads are linearizable, from any node, whatever the
    leader went through (a read that failed is not counted).

  Returns `{:ok, counts}` or `{:error, problems}`.
  """

  @refused [:wrong_expected_seq, :entity_erased, :invalid]

  def check(history, read) do
    {reads, writes} = Enum.split_with(history, &match?({:read, _, _, _}, &1))
    checked = for {:read, id, acked, seen} <- reads, is_integer(seen), do: {id, acked, seen}
    stale = for {id, acked, seen} <- checked, seen < acked, do: {id, :stale_read, acked, seen}
    counts = %{acked: 0, refused: 0, unknown: 0, unknown_stored: 0, reads: length(checked)}

    writes
    |> Enum.group_by(&elem(&1, 0))
    |> Enum.reduce({counts, stale}, fn {id, attempts}, {counts, problems} ->
      case read.(id) do
        {:ok, stored} -> check_entity(id, attempts, stored, counts, problems)
        other -> {counts, [{id, :unreadable, other} | problems]}
      end
    end)
    |> case do
      {counts, []} -> {:ok, counts}
      {_counts, problems} -> {:error, problems}
    end
  end

  defp check_entity(id, attempts, stored, counts, problems) do
    seqs = Enum.map(stored, &elem(&1, 0))
    values = Enum.map(stored, &elem(&1, 1))
    at = Map.new(stored, fn {seq, value} -> {value, seq} end)
    attempted = MapSet.new(attempts, &elem(&1, 1))

    problems =
      problems
      |> add(seqs != Enum.to_list(1..length(seqs)//1), {id, :gaps, seqs})
      |> add(length(Enum.uniq(values)) != length(values), {id, :stored_twice, values -- Enum.uniq(values)})
      |> add(
        Enum.any?(values, &(not MapSet.member?(attempted, &1))),
        {id, :never_attempted, Enum.reject(values, &MapSet.member?(attempted, &1))}
      )

    Enum.reduce(attempts, {counts, problems}, fn {_id, value, _expected, result}, {counts, problems} ->
      case classify(result) do
        {:acked, seq} ->
          ok = Map.get(at, value) == seq
          {bump(counts, :acked), add(problems, not ok, {id, :acked_missing, value, seq, Map.get(at, value)})}

        :refused ->
          {bump(counts, :refused), add(problems, Map.has_key?(at, value), {id, :refused_but_stored, value, result})}

        :unknown ->
          counts = bump(counts, :unknown)
          {if(Map.has_key?(at, value), do: bump(counts, :unknown_stored), else: counts), problems}
      end
    end)
  end

  defp classify({:ok, seq}), do: {:acked, seq}
  defp classify({:error, {reason, _, _}}) when reason in @refused, do: :refused
  defp classify({:error, :entity_erased}), do: :refused
  defp classify(_other), do: :unknown

  defp add(problems, true, problem), do: [problem | problems]
  defp add(problems, false, _problem), do: problems
  defp bump(counts, key), do: Map.update!(counts, key, &(&1 + 1))
end
