-- Usage per customer, subscription period, meter and dimension within a month: the sum of the period's days.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, period_start, meter_id, dimension]
*/
with daily as (
    select * from fct_usage_by_day
    where day >= $start_date::date and day < $end_date::date
),

periods as (
    select * from dim_subscription_periods_by_month
    where month >= $start_date::date and month < $end_date::date
),

final as (
    select
        $start_date::date as month,
        periods.customer_id,
        periods.period_start,
        any_value(periods.period_end) as period_end,
        daily.meter_id,
        daily.dimension,
        any_value(daily.kind) as kind,
        sum(daily.usage)::decimal(38, 9) as usage,
        sum(daily.gauge_integral)::decimal(38, 9) as gauge_integral,
        sum(daily.gauge_covered_ms)::bigint as gauge_covered_ms,
        max(daily.gauge_peak)::decimal(38, 9) as gauge_peak,
        ($end_ms - $start_ms)::bigint as month_ms,
        count(*)::bigint as days_with_data,
        -- samples and events inside the period (a level carried in from before it is not one)
        sum(daily.samples + daily.events)::bigint as observations
    from daily
    inner join periods
        on daily.customer_id = periods.customer_id
        and daily.day >= periods.period_start
        and daily.day < periods.period_end
    group by periods.customer_id, periods.period_start, daily.meter_id, daily.dimension
)

select * from final
