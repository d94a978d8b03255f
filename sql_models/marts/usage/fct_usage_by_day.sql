-- Exact usage per customer, meter, dimension and UTC day: reset-aware counter increase, gauge integral and peak of the sum, plus delta and gauge events.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, dimension]
lookback_days: 35
require_complete_lookback: true  # a missing earlier day would bill a counter's whole value as new
*/
with edges as (
    select * from int_series_edges_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

series as (
    select * from dim_series
    where meter_id is not null and customer_id is not null
),

events as (
    select * from stg_raw__events
),

-- the day's own carry-in (each series' last sample before it), where its ingest records one
carry_in as (
    select * from stg_raw__carry_in
    where ts_ms >= $lookback_start_ms and ts_ms < $start_ms and isfinite(value)
),

peaks as (
    select * from int_gauge_peaks_by_day
    where day >= $start_date::date and day < $end_date::date
),

today as (
    select * from edges
    where day >= $start_date::date and day < $end_date::date
),

-- rule 3: each series' last sample before the day: the latest of the edges of up to 35 earlier days
-- and the day's carry-in (the same sample when both hold it; ties keep the larger value, like edges)
earlier_samples as (
    select
        series_id,
        last_ts_ms as ts_ms,
        last_value as value
    from edges
    where day < $start_date::date and samples > 0
    union all
    select
        series_id,
        ts_ms,
        value
    from carry_in
),

previous as (
    select
        series_id,
        value as prev_value,
        ts_ms as prev_ts_ms
    from earlier_samples
    qualify row_number() over (partition by series_id order by ts_ms desc, value desc) = 1
),

joined as (
    select
        coalesce(today.series_id, previous.series_id) as series_id,
        coalesce(today.samples, 0) as samples,
        coalesce(today.dropped_samples, 0) as dropped_samples,
        today.first_ts_ms,
        today.first_value,
        coalesce(today.in_day_increase, 0) as in_day_increase,
        coalesce(today.resets, 0) as resets,
        coalesce(today.in_day_integral, 0) as in_day_integral,
        coalesce(today.in_day_covered_ms, 0) as in_day_covered_ms,
        coalesce(today.max_gap_ms, 0) as max_gap_ms,
        coalesce(today.duplicate_conflicts, 0) as duplicate_conflicts,
        previous.prev_value,
        previous.prev_ts_ms
    from today
    full outer join previous
        on today.series_id = previous.series_id
    where today.series_id is not null
        or previous.prev_ts_ms + $staleness_ms > $start_ms
),

per_series as (
    select
        series.customer_id,
        series.meter_id,
        series.dimension,
        series.kind,
        joined.*,
        -- rule 4: seen again after a gap longer than the lookback: flagged, its first value not counted
        (joined.samples > 0 and joined.prev_value is null and series.first_seen_ms < $lookback_start_ms)
            as reappeared,
        case
            when joined.samples = 0 then 0
            -- rule 2: the pair straddling midnight belongs to the later sample's day
            when joined.prev_value is not null then counter_increase(joined.first_value, joined.prev_value)
            when series.first_seen_ms < $lookback_start_ms then 0
            -- rule 4: a new series started from zero
            else exact_value(joined.first_value)
        end as boundary_increase,
        (joined.samples > 0 and joined.prev_value is not null and counter_reset(joined.first_value, joined.prev_value))::integer
            as boundary_resets,
        -- rule 5: yesterday's last gauge sample holds into today until the first sample or staleness
        case
            when joined.prev_ts_ms is null then 0
            else greatest(
                    0,
                    least(coalesce(joined.first_ts_ms, $end_ms), joined.prev_ts_ms + $staleness_ms, $end_ms) - $start_ms
                )
        end as carry_in_ms
    from joined
    inner join series
        on joined.series_id = series.series_id
),

-- usage events (raw/events) of the customer whose label_value is the event's customer_key (unknown
-- keys are not billed, like unmatched series). A 'delta' adds its quantity to a counter's usage. A
-- 'gauge' is a level that holds until the next gauge event of its stream (customer_key, meter_id,
-- dimension) or ts + hold_ms, whichever is first; raw_events also holds the day before the window,
-- whose last levels carry into today (hold_ms <= one day), like yesterday's last gauge sample.
-- Deltas of the day only; gauges of the day and the day before (the carry-in), each with the part of
-- its span inside today. Two scans with plain filters, so the Parquet reader skips what it can and
-- only gauges are sorted for the window.
event_spans as (
    select
        customer_key,
        meter_id,
        dimension,
        kind,
        true as today,
        quantity,
        0::bigint as covered_ms
    from events
    where kind = 'delta' and ts_ms >= $start_ms and ts_ms < $end_ms
    union all
    select
        customer_key,
        meter_id,
        dimension,
        kind,
        ts_ms >= $start_ms as today,
        quantity,
        -- two events at the same ts: the later event_id holds, the other covers nothing
        greatest(
            0,
            least(coalesce(lead(ts_ms) over by_stream, $end_ms), ts_ms + hold_ms, $end_ms)
            - greatest(ts_ms, $start_ms)
        )::bigint as covered_ms
    from events
    where kind = 'gauge' and ts_ms >= $start_ms - 86400000 and ts_ms < $end_ms
    window by_stream as (partition by customer_key, meter_id, dimension order by ts_ms, event_id)
),

event_usage as (
    select
        customers.customer_id,
        event_spans.meter_id,
        event_spans.dimension,
        meters.kind,
        coalesce(sum(event_spans.quantity) filter (where event_spans.kind = 'delta'), 0)
        ::decimal(38, 9) as increase,
        -- decimal(38, 9) * bigint stays decimal(38, 9): exact
        sum(event_spans.quantity * event_spans.covered_ms)::decimal(38, 9) as integral,
        sum(event_spans.covered_ms)::bigint as covered_ms,
        (count(*) filter (where event_spans.today))::bigint as events
    from event_spans
    inner join stg_seeds__customers as customers
        on event_spans.customer_key = customers.label_value
    inner join stg_seeds__meters as meters
        on event_spans.meter_id = meters.meter_id
        and meters.kind = case event_spans.kind when 'delta' then 'counter' else 'gauge' end
    where event_spans.today or event_spans.covered_ms > 0
    group by customers.customer_id, event_spans.meter_id, event_spans.dimension, meters.kind
),

-- one row per series (samples) and per (customer, meter, dimension) of events, summed below
contributions as (
    select
        customer_id,
        meter_id,
        dimension,
        kind,
        boundary_increase + in_day_increase as increase,
        in_day_integral + coalesce(exact_value(prev_value), 0) * carry_in_ms as integral,
        in_day_covered_ms + carry_in_ms as covered_ms,
        1 as series,
        samples,
        dropped_samples,
        resets + boundary_resets as resets,
        reappeared,
        max_gap_ms,
        duplicate_conflicts,
        0 as events
    from per_series
    union all by name
    select
        customer_id,
        meter_id,
        dimension,
        kind,
        increase,
        integral,
        covered_ms,
        0 as series,
        0 as samples,
        0 as dropped_samples,
        0 as resets,
        false as reappeared,
        0 as max_gap_ms,
        0 as duplicate_conflicts,
        events
    from event_usage
),

usage as (
    select
        customer_id,
        meter_id,
        dimension,
        any_value(kind) as kind,
        case when any_value(kind) = 'counter'
                then sum(increase)::decimal(38, 9)
        end as usage,
        case when any_value(kind) = 'gauge'
                then sum(integral)::decimal(38, 9)
        end as gauge_integral,
        case when any_value(kind) = 'gauge'
                then sum(covered_ms)::bigint
        end as gauge_covered_ms,
        sum(series)::bigint as series,
        sum(samples)::bigint as samples,
        sum(dropped_samples)::bigint as dropped_samples,
        -- a gauge going down is not a reset
        case when any_value(kind) = 'counter' then sum(resets) else 0 end::bigint as resets,
        count(*) filter (where reappeared)::bigint as reappeared_series,
        max(max_gap_ms)::bigint as max_gap_ms,
        sum(events)::bigint as events,
        -- (series, ts) with different values: the larger was billed (int_series_edges_by_day)
        sum(duplicate_conflicts)::bigint as duplicate_conflicts
    from contributions
    group by customer_id, meter_id, dimension
),

final as (
    select
        $start_date::date as day,
        usage.customer_id,
        usage.meter_id,
        usage.dimension,
        usage.kind,
        usage.usage,
        usage.gauge_integral,
        usage.gauge_covered_ms,
        -- rule 5: the peak over time of the customer's sum of series and gauge event streams
        case when usage.kind = 'gauge' then coalesce(peaks.gauge_peak, 0)::decimal(38, 9) end as gauge_peak,
        usage.series,
        usage.samples,
        usage.dropped_samples,
        usage.resets,
        usage.reappeared_series,
        usage.max_gap_ms,
        usage.events,
        usage.duplicate_conflicts,
        -- the time some level of the customer holds (gauge_covered_ms adds up every series' time)
        case when usage.kind = 'gauge' then coalesce(peaks.gauge_held_ms, 0)::bigint end as gauge_held_ms
    from usage
    left join peaks
        on usage.customer_id = peaks.customer_id
        and usage.meter_id = peaks.meter_id
        and usage.dimension = peaks.dimension
)

select * from final
