defmodule Kuma.Export do
  @moduledoc """
  Everything stored about one entity, decrypted (GDPR Art. 20): `Kuma.export/2` and
  `Kuma.export_json/2`.

  `Kuma.export/2` returns a map:

      %{
        format: "kuma-export-v1",
        store_id: "…",                 # the store's id (from its manifest)
        entity_id: "alice",
        exported_at: ~U[...],
        verified: true,                 # the hash chain recomputed intact
        head: %{seq: 3, hash: <<32 bytes>>} | nil,
        events: [%Kuma.Envelope{}, ...],   # every event, in seq order, data upcast
        snapshots: [%{seq:, version:, timestamp:, hash:, state:}]
      }

  Event data goes through the same upcasters as every other read path: the store's, and
  the aggregate's when exporting through an entity handle (`Kuma.export(entity)`); in the
  JSON, `data_etf` holds that upcast term. `Kuma.Sensitive` values are opened (or show
  their placeholder if their subject was erased).

  ## JSON (`Kuma.export_json/2`)

  The same content as one JSON object, for humans and other programs. Written with
  `Kuma.JSON` (a small encoder in this repository: hex.pm and so jason are not reachable,
  and an Elixir encoder can map Elixir terms better than serde_json in the NIF could):

      {"format": "kuma-export-v1", "store_id": "…", "entity_id": "alice",
       "exported_at": "2026-11-22T10:00:00.000000Z", "verified": true,
       "head": {"seq": 3, "hash": "<64 hex>"},
       "events": [{"seq": 1, "position": 17, "type": "opened",
                   "timestamp": "2026-11-22T09:59:58.123456Z", "timestamp_us": 1795341598123456,
                   "metadata": {...}, "data": <term as JSON>, "data_etf": "<base64>",
                   "hash": "<64 hex>"}, ...],
       "snapshots": [{"seq": 100, "version": 1, "timestamp": "…", "hash": "<64 hex>",
                      "state": <term as JSON>}]}

  `data_etf` is the exact term (`:erlang.term_to_binary/1`, base64) for a lossless
  round-trip; `data` renders the term as JSON by these rules:

  | Elixir                                   | JSON                                              |
  | ---------------------------------------- | ------------------------------------------------- |
  | `nil`, `true`, `false`                   | `null`, `true`, `false`                           |
  | integer, float                           | number                                            |
  | other atom                               | string (`:credited` -> `"credited"`)              |
  | UTF-8 binary                             | string                                            |
  | other binary                             | `{"$binary": "<base64>"}`                         |
  | list                                     | array (improper: `{"$improper_list": [...], "tail": ...}`) |
  | tuple                                    | `{"$tuple": [...]}`                               |
  | map with atom/string keys                | object (keys sorted)                              |
  | other map                                | `{"$map": [[key, value], ...]}`                   |
  | `DateTime`, `NaiveDateTime`, `Date`, `Time` | ISO 8601 string                                |
  | `Kuma.Sensitive`                         | `{"$sensitive": subject, "value": ..., "erased": bool}` |
  | other struct                             | object of its fields plus `"$struct": "Module.Name"` |
  | pid, reference, port, function           | its `inspect/1` text                              |

  Entity ids and hashes: ids that are not UTF-8 use the `$binary` form; hashes are
  lowercase hex.
  """

  alias Kuma.{Codec, EventLog, Native, Store}

  @format "kuma-export-v1"

  @doc false
  @spec export(Store.t(), binary(), module() | nil) :: {:ok, map()} | {:error, term()}
  def export(%Store{} = s, id, aggregate \\ nil) do
    with {:ok, head} <- EventLog.head(s, id),
         {:ok, events} <- EventLog.events(s, id, []),
         {:ok, snapshots} <- Native.read_snapshots(s.native, id) do
      {:ok,
       %{
         format: @format,
         store_id: s.store_id,
         entity_id: id,
         exported_at: DateTime.utc_now(),
         verified: match?({:ok, {:intact, _}}, Native.read_verify_entity(s.native, id)),
         head: head && Map.take(head, [:seq, :hash]),
         events: upcast(events, aggregate),
         snapshots: Enum.map(snapshots, &snapshot(s, id, &1))
       }}
    end
  rescue
    e in [Kuma.Error, Kuma.DecodeError] -> {:error, Map.get(e, :reason)}
  end

  defp upcast(events, nil), do: events
  defp upcast(events, aggregate), do: Enum.map(events, &%{&1 | data: Kuma.Entity.Loader.upcast(aggregate, &1)})

  defp snapshot(s, id, %{seq: seq, data: data} = snap) do
    snap |> Map.delete(:data) |> Map.put(:state, Codec.decode_stored(data, "", id, seq, s, nil))
  end

  @doc false
  # The JSON document of an export map.
  @spec to_json(map()) :: String.t()
  def to_json(export) do
    {:object,
     [
       format: export.format,
       store_id: export.store_id,
       entity_id: value(export.entity_id),
       exported_at: DateTime.to_iso8601(export.exported_at),
       verified: export.verified,
       head: export.head && {:object, [seq: export.head.seq, hash: hex(export.head.hash)]},
       events: Enum.map(export.events, &event_json/1),
       snapshots:
         Enum.map(export.snapshots, fn snap ->
           {:object,
            [
              seq: snap.seq,
              version: snap.version,
              timestamp: iso_us(snap.timestamp),
              hash: hex(snap.hash),
              state: value(snap.state)
            ]}
         end)
     ]}
    |> Kuma.JSON.encode!()
  end

  defp event_json(%Kuma.Envelope{} = e) do
    {:object,
     [
       seq: e.seq,
       position: e.position,
       type: e.type,
       timestamp: iso_us(e.timestamp),
       timestamp_us: e.timestamp,
       metadata: value(e.metadata),
       data: value(e.data),
       data_etf: Base.encode64(:erlang.term_to_binary(e.data)),
       hash: hex(e.hash)
     ]}
  end

  defp hex(bytes), do: Base.encode16(bytes, case: :lower)
  defp iso_us(us), do: us |> DateTime.from_unix!(:microsecond) |> DateTime.to_iso8601()

  @doc """
  Renders an Elixir term as a JSON value (`Kuma.JSON` input) by the rules in the table above.

      iex> Kuma.Export.value({:ok, %{amount: 5, note: <<255>>}}) |> Kuma.JSON.encode!()
      ~s({"$tuple":["ok",{"amount":5,"note":{"$binary":"/w=="}}]})
  """
  @spec value(term()) :: term()
  def value(v) when v in [nil, true, false], do: v
  def value(v) when is_number(v), do: v
  def value(v) when is_atom(v), do: Atom.to_string(v)

  def value(v) when is_binary(v) do
    if String.valid?(v), do: v, else: {:object, [{"$binary", Base.encode64(v)}]}
  end

  def value(v) when is_bitstring(v), do: {:object, [{"$bitstring", inspect(v)}]}

  def value(v) when is_list(v) do
    case proper_split(v, []) do
      {items, []} -> Enum.map(items, &value/1)
      {items, tail} -> {:object, [{"$improper_list", Enum.map(items, &value/1)}, {"tail", value(tail)}]}
    end
  end

  def value(v) when is_tuple(v), do: {:object, [{"$tuple", v |> Tuple.to_list() |> Enum.map(&value/1)}]}
  def value(%DateTime{} = v), do: DateTime.to_iso8601(v)
  def value(%NaiveDateTime{} = v), do: NaiveDateTime.to_iso8601(v)
  def value(%Date{} = v), do: Date.to_iso8601(v)
  def value(%Time{} = v), do: Time.to_iso8601(v)

  def value(%Kuma.Sensitive{} = v),
    do: {:object, [{"$sensitive", value(v.subject)}, {"value", value(Kuma.Sensitive.value(v))}, {"erased", v.erased}]}

  def value(%module{} = v) do
    fields = v |> Map.from_struct() |> Enum.sort_by(fn {k, _} -> Atom.to_string(k) end)

    {:object,
     [{"$struct", Codec.module_type(module)} | Enum.map(fields, fn {k, val} -> {Atom.to_string(k), value(val)} end)]}
  end

  def value(v) when is_map(v) do
    pairs = Enum.map(v, fn {k, val} -> {k, val} end)
    keys = Enum.map(pairs, fn {k, _} -> if is_atom(k) or is_binary(k), do: to_string(k) end)

    if Enum.all?(keys, &(is_binary(&1) and String.valid?(&1))) and length(Enum.uniq(keys)) == length(keys) do
      {:object, pairs |> Enum.map(fn {k, val} -> {to_string(k), value(val)} end) |> Enum.sort()}
    else
      {:object, [{"$map", pairs |> Enum.sort() |> Enum.map(fn {k, val} -> [value(k), value(val)] end)}]}
    end
  end

  def value(v), do: inspect(v)

  defp proper_split([h | t], acc), do: proper_split(t, [h | acc])
  defp proper_split([], acc), do: {Enum.reverse(acc), []}
  defp proper_split(tail, acc), do: {Enum.reverse(acc), tail}
end
