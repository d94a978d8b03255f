-- Per customer, gauge meter, dimension and UTC day: the exact peak over time of the customer's sum of levels (series and gauge events) and the time any level holds.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, dimension]
lookback_days: 35
require_complete_lookback: true  # a series' last sample before the day holds into it
# the hot path: gauge samples gathered by streaming the raw day and summed by compiled code (same
# output, to the unit); this SQL is its specification (tests/test_fastpath.py compares them)
engine: python
python: billing_dags.models.fastpath:gauge_peaks_by_day
*/
with samples as (
    select * from stg_raw__samples
    where ts_ms >= $start_ms and ts_ms < $end_ms
),

edges as (
    select * from int_series_edges_by_day
    where day >= $lookback_start_date::date and day < $start_date::date and samples > 0
),

-- the day's own carry-in (each series' last sample before it), where its ingest records one
carry_in as (
    select * from stg_raw__carry_in
    where ts_ms >= $lookback_start_ms and ts_ms < $start_ms and isfinite(value)
),

series as (
    select * from dim_series
    where kind = 'gauge' and customer_id is not null
),

events as (
    select * from stg_raw__events
),

customers as (
    select * from stg_seeds__customers
),

meters as (
    select * from stg_seeds__meters
),

-- one sample per (series, ts), as in int_series_edges_by_day: the larger value
deduplicated as (
    select
        samples.series_id,
        samples.ts_ms,
        max(samples.value) as value
    from samples
    inner join series
        on samples.series_id = series.series_id
    where isfinite(samples.value)
    group by samples.series_id, samples.ts_ms
),

-- rule 3: each series' last sample before the day, the latest of the earlier days' edges and the
-- day's carry-in (ties keep the larger value, as in fct_usage_by_day)
earlier_samples as (
    select
        series_id,
        last_ts_ms as ts_ms,
        last_value as value
    from edges
    union all
    select
        series_id,
        ts_ms,
        value
    from carry_in
),

-- rule 5: it holds into the day, at most the staleness limit
carried as (
    select
        earlier_samples.series_id,
        earlier_samples.value,
        earlier_samples.ts_ms
    from earlier_samples
    inner join series
        on earlier_samples.series_id = series.series_id
    where earlier_samples.ts_ms + $staleness_ms > $start_ms
    qualify row_number() over (partition by earlier_samples.series_id order by earlier_samples.ts_ms desc, earlier_samples.value desc) = 1
),

-- each sample (and the carried one) holds until the series' next sample, at most the staleness
-- limit, clipped to the day
sample_spans as (
    select
        series_id,
        greatest(ts_ms, $start_ms) as from_ms,
        least(coalesce(lead(ts_ms) over by_time, $end_ms), ts_ms + $staleness_ms, $end_ms) as until_ms,
        exact_value(value) as level
    from (
        select
            series_id,
            ts_ms,
            value
        from deduplicated
        union all
        select
            series_id,
            ts_ms,
            value
        from carried
    ) as points
    window by_time as (partition by series_id order by ts_ms)
),

-- a gauge event holds until the next event of its stream or ts + hold_ms (as in fct_usage_by_day)
event_spans as (
    select
        customers.customer_id,
        streams.meter_id,
        streams.dimension,
        streams.from_ms,
        streams.until_ms,
        streams.level
    from (
        select
            customer_key,
            meter_id,
            dimension,
            greatest(ts_ms, $start_ms) as from_ms,
            least(coalesce(lead(ts_ms) over by_stream, $end_ms), ts_ms + hold_ms, $end_ms) as until_ms,
            quantity as level
        from events
        where kind = 'gauge' and ts_ms >= $start_ms - 86400000 and ts_ms < $end_ms
        window by_stream as (partition by customer_key, meter_id, dimension order by ts_ms, event_id)
    ) as streams
    inner join customers
        on streams.customer_key = customers.label_value
    inner join meters
        on streams.meter_id = meters.meter_id and meters.kind = 'gauge'
    where streams.until_ms > streams.from_ms
),

spans as (
    select
        series.customer_id,
        series.meter_id,
        series.dimension,
        sample_spans.from_ms,
        sample_spans.until_ms,
        sample_spans.level
    from sample_spans
    inner join series
        on sample_spans.series_id = series.series_id
    where sample_spans.until_ms > sample_spans.from_ms
    union all
    select
        customer_id,
        meter_id,
        dimension,
        from_ms,
        until_ms,
        level
    from event_spans
),

-- the customer's sum changes only where a span starts or ends
changes as (
    select
        customer_id,
        meter_id,
        dimension,
        at_ms,
        sum(level_change) as level_change,
        sum(held_change) as held_change
    from (
        select
            customer_id,
            meter_id,
            dimension,
            from_ms as at_ms,
            level as level_change,
            1 as held_change
        from spans
        union all
        select
            customer_id,
            meter_id,
            dimension,
            until_ms as at_ms,
            -level as level_change,
            -1 as held_change
        from spans
        where until_ms < $end_ms
    ) as span_edges
    group by customer_id, meter_id, dimension, at_ms
),

levels as (
    select
        customer_id,
        meter_id,
        dimension,
        at_ms,
        sum(level_change) over by_time as level,
        sum(held_change) over by_time as held,
        coalesce(lead(at_ms) over by_time, $end_ms) - at_ms as lasts_ms
    from changes
    window by_time as (partition by customer_id, meter_id, dimension order by at_ms rows unbounded preceding)
),

final as (
    select
        $start_date::date as day,
        customer_id,
        meter_id,
        dimension,
        -- rule 5: the peak of the sum over the time some level holds (not the sum of peaks)
        (max(level) filter (where held > 0))::decimal(38, 9) as gauge_peak,
        coalesce(sum(lasts_ms) filter (where held > 0), 0)::bigint as gauge_held_ms
    from levels
    group by customer_id, meter_id, dimension
)

select * from final
