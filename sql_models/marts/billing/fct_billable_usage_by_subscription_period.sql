-- Billable quantity per customer, subscription period, meter and dimension: the meter's aggregation of the period's usage, in base and billing units.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, period_start, meter_id, dimension]
group: billing
*/
with usage as (
    select * from fct_usage_by_subscription_period
    where month >= $start_date::date and month < $end_date::date
),

meters as (
    select * from stg_seeds__meters
),

units as (
    select * from stg_seeds__units
),

-- rule 5: the quantity in base units x 1e9 by the meter's aggregation, rounded half-up once
quantities as (
    select
        usage.month,
        usage.customer_id,
        usage.period_start,
        usage.period_end,
        usage.meter_id,
        usage.dimension,
        meters.aggregation,
        meters.unit as base_unit,
        meters.billing_unit
        || case meters.aggregation when 'unit_hours' then '-hour' when 'unit_months' then '-month' else '' end
            as unit,
        units.divisor,
        usage.days_with_data,
        usage.observations,
        case meters.aggregation
            when 'sum' then to_nano(usage.usage)
            when 'max' then to_nano(usage.gauge_peak)
            -- over the covered time; a period without a sample or event of its own bills nothing
            when 'avg'
                then
                    case when usage.gauge_covered_ms > 0 and usage.observations > 0
                            then div_half_up(to_nano(usage.gauge_integral), usage.gauge_covered_ms)
                        else 0
                    end
            when 'unit_hours' then div_half_up(to_nano(usage.gauge_integral), 3600000)
            when 'unit_months' then div_half_up(to_nano(usage.gauge_integral), usage.month_ms)
        end as quantity_nano
    from usage
    inner join meters
        on usage.meter_id = meters.meter_id
    inner join units
        on meters.unit = units.unit
        and meters.billing_unit = units.billing_unit
),

final as (
    select
        month,
        customer_id,
        period_start,
        period_end,
        meter_id,
        dimension,
        aggregation,
        from_nano(quantity_nano) as base_quantity,
        base_unit,
        -- in billing units, rounded half-up to 1e-9 as the invoice line shows it
        from_nano(div_half_up(quantity_nano, divisor)) as quantity,
        unit,
        divisor,
        days_with_data,
        observations
    from quantities
)

select * from final
